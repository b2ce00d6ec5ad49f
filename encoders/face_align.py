"""Portrait alignment: FFHQ's quad procedure, the framing Arc2Face's 512x512 images have.

One function serves training data (``training.annotate``) and the Reference Adapter node, so the
Reference UNet sees at inference the framing it was trained on. FFHQ's alignment (Karras et al.;
``image_align`` in Arc2Face's demo) takes the eye centres and mouth corners from 68 landmarks;
insightface's 5 keypoints (eye centres, nose tip, mouth corners, image left to right) give the same
four points, so the quad is computed from them.

FFHQ then pads the picture with a blurred reflection and warps with PIL's QUAD transform at 4096
pixels before downscaling. Here the picture's edges are mirrored and, for faces much larger than
the output, it is shrunk with area averaging before one affine warp: the framing is the same, the
pixels at the borders differ slightly.
"""

from __future__ import annotations

import numpy as np

from .optional import require


def ffhq_quad(kps) -> np.ndarray:
    """FFHQ's oriented crop square from 5 keypoints, in pixels: corners top-left, bottom-left,
    bottom-right, top-right."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    eye_left, eye_right, mouth_left, mouth_right = kps[0], kps[1], kps[3], kps[4]
    eye_centre = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) * 0.5 - eye_centre
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    length = np.hypot(*x)
    if not np.isfinite(length) or length < 1e-6:
        raise ValueError(f"cannot align a face from keypoints {kps.tolist()}")
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / length
    y = np.flipud(x) * [-1, 1]
    centre = eye_centre + eye_to_mouth * 0.1
    return np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])


def portrait_matrix(keypoints, size: int = 512) -> np.ndarray:
    """The 2x3 affine map (pixel-centre coordinates) taking FFHQ's quad onto a ``size`` x ``size`` crop.

    As PIL's QUAD transform in FFHQ's script, the quad's corners land on the crop's outer pixel
    edges (-0.5 and size - 0.5 in pixel-centre coordinates).
    """
    return _quad_to_square(ffhq_quad(keypoints), size)


def _quad_to_square(quad: np.ndarray, size: int) -> np.ndarray:
    top_left, bottom_left, bottom_right = quad[0], quad[1], quad[2]
    # columns: where the crop's x and y unit vectors come from in the picture
    source = np.column_stack([(bottom_right - bottom_left), (bottom_left - top_left)]) / size
    linear = np.linalg.inv(source)
    translation = -0.5 - linear @ top_left
    return np.hstack([linear, translation[:, None]]).astype(np.float64)


def align_face(image: np.ndarray, keypoints, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The FFHQ-aligned ``size`` x ``size`` crop of an HxWxC image and the 2x3 picture->crop matrix."""
    cv2 = require("cv2", "Face alignment")
    quad = ffhq_quad(keypoints)
    matrix = _quad_to_square(quad, size)
    side = float(np.hypot(*(quad[3] - quad[0])))
    source, warp = np.ascontiguousarray(image), matrix
    if side > 2 * size:
        # Shrink first with area averaging: a direct warp of a much larger square aliases.
        factor = 2 * size / side
        source = cv2.resize(source, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        # a pixel centre p of the shrunk picture sits at (p + 0.5) / factor - 0.5 in the original
        to_original = np.array([[1 / factor, 0, 0.5 / factor - 0.5], [0, 1 / factor, 0.5 / factor - 0.5], [0, 0, 1]])
        warp = matrix @ to_original
    crop = cv2.warpAffine(source, warp.astype(np.float32), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)
    return crop, matrix.astype(np.float32)


def align_portrait(image: np.ndarray, keypoints, size: int = 512) -> np.ndarray:
    """An HxWxC image warped to a ``size`` x ``size`` aligned portrait (edges mirrored, not black)."""
    return align_face(image, keypoints, size)[0]


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
