"""Portrait alignment from 5 face keypoints: the framing Arc2Face's 512x512 images have.

Arc2Face was trained on FFHQ-style aligned portraits (the eyes level, the face centred with hair
and chin in frame). FFHQ aligns with 68 landmarks; from insightface's 5 points (eye centres, nose
tip, mouth corners, image left to right) a similarity transform onto where those points sit in
FFHQ's framing gives the same crop to within a few pixels.
"""

from __future__ import annotations

import numpy as np

from .optional import require

# (x, y) as fractions of the side in FFHQ's framing: the crop is 4 eye-distances wide, centred
# a tenth of the eye-to-mouth vector below the eyes.
FFHQ_FIVE_POINTS = np.array([[0.375, 0.47], [0.625, 0.47], [0.5, 0.61], [0.40, 0.745], [0.60, 0.745]], dtype=np.float32)


def portrait_matrix(keypoints, size: int = 512) -> np.ndarray:
    """The 2x3 least-squares similarity transform (Umeyama) taking the 5 keypoints (pixels) onto the
    FFHQ framing at ``size``. Least squares spreads the misfit of a posed head over all five points,
    where a robust fit would frame the face on whichever subset fits best."""
    source = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    target = FFHQ_FIVE_POINTS.astype(np.float64) * size
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centred, target_centred = source - source_mean, target - target_mean
    variance = (source_centred**2).sum() / len(source)
    if not np.isfinite(variance) or variance < 1e-6:
        raise ValueError(f"cannot align a face from keypoints {source.tolist()}")
    u, singular, vt = np.linalg.svd(target_centred.T @ source_centred / len(source))
    reflection = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ reflection @ vt
    scale = (singular * np.diag(reflection)).sum() / variance
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]]).astype(np.float32)


def align_portrait(image: np.ndarray, keypoints, size: int = 512) -> np.ndarray:
    """An HxWxC image warped to a size x size aligned portrait (edges mirrored, not black)."""
    cv2 = require("cv2", "Face alignment")
    matrix = portrait_matrix(keypoints, size)
    scale = float(np.hypot(*matrix[0, :2]))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_REFLECT)


def aligned_portraits(analyzer, images, size: int = 512, face_index: int = 0):
    """The chosen face of every image as an aligned ``size`` x ``size`` portrait: a float IMAGE batch (B, H, W, 3).

    Raises ``FaceNotFoundError`` naming the image when one has no face.
    """
    import torch

    from .images import split_batch, to_uint8_rgb

    faces = analyzer.analyze(images, face_index=face_index)
    portraits = [align_portrait(to_uint8_rgb(image, f"image {i + 1}"), face.kps, size)
                 for i, (image, face) in enumerate(zip(split_batch(images), faces))]
    return torch.from_numpy(np.stack(portraits)).float() / 255.0
