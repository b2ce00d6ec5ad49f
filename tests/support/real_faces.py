"""Real faces for tests of the real MediaPipe model: insightface's shipped pictures and the t1.jpg face geometry
of the shared test data (``../shared/testdata/t1_faces.npz``: dlib boxes, MediaPipe FaceMesh 478 points)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from support.onnx_face_models import TESTDATA, insightface_images


def read_rgb(name: str) -> np.ndarray:
    """One of insightface's pictures (``t1.jpg``, ``Tom_Hanks_54745.png``) as RGB uint8."""
    import cv2

    return cv2.imread(str(insightface_images() / name))[:, :, ::-1].copy()


def t1_faces() -> dict[str, np.ndarray] | None:
    """The test data of three t1.jpg faces; ``mesh_px``: their 478 MediaPipe points in t1.jpg pixels (x, y)."""
    path = TESTDATA / "t1_faces.npz"
    if not path.is_file():
        return None
    data = dict(np.load(path))
    height, width = read_rgb("t1.jpg").shape[:2]
    data["mesh_px"] = data["lm478"][..., :2] * np.array([width, height], np.float32)
    return data


def square_around(box, picture: np.ndarray, scale: float = 2.0) -> tuple[int, int, int, int]:
    """A square ``scale`` times the box's larger side, centred on it, clipped to the picture
    (pixel bounds x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half = max(x1 - x0, y1 - y0) * scale / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    height, width = picture.shape[:2]
    return (max(0, int(round(cx - half))), max(0, int(round(cy - half))),
            min(width, int(round(cx + half))), min(height, int(round(cy + half))))


def crop(rgb: np.ndarray, bounds) -> np.ndarray:
    x0, y0, x1, y1 = bounds
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def as_image(*pictures: np.ndarray) -> torch.Tensor:
    """RGB uint8 pictures of one size as a ComfyUI IMAGE batch (B x H x W x 3, 0..1)."""
    return torch.from_numpy(np.stack(pictures)).float() / 255.0


def arcface_template() -> np.ndarray:
    """insightface's 5-point ArcFace template for 112x112 crops (eyes, nose tip, mouth corners; image left first)."""
    from insightface.utils import face_align

    return np.asarray(face_align.arcface_dst, dtype=np.float32)


class DetectedFaces(NamedTuple):
    """Face pictures with what the real MediaPipe model found on them, and the test data's reference mesh."""

    images: torch.Tensor  # B x S x S x 3, 0..1
    result: object  # encoders.face_landmarks.FaceLandmarkerResult
    reference_px: np.ndarray  # B x 478 x 2, the test data's points in these pictures' pixels


def detect_t1_faces(task_path, faces=(0, 1), size: int = 256) -> DetectedFaces | None:
    """Frontal t1.jpg faces (the test data's first two; the third is in profile), each cropped 2x around its
    box and resized to ``size``, run through the real model. None where the test data is absent."""
    import cv2

    from encoders.face_landmarks import FaceLandmarker

    data = t1_faces()
    if data is None:
        return None
    t1 = read_rgb("t1.jpg")
    pictures, references = [], []
    for index in faces:
        x0, y0, x1, y1 = square_around(data["boxes"][index], t1)
        pictures.append(cv2.resize(crop(t1, (x0, y0, x1, y1)), (size, size), interpolation=cv2.INTER_AREA))
        references.append((data["mesh_px"][index] - [x0, y0]) * [size / (x1 - x0), size / (y1 - y0)])
    images = as_image(*pictures)
    with FaceLandmarker(task_path) as landmarker:
        result = landmarker.detect(images)
    return DetectedFaces(images, result, np.stack(references).astype(np.float32))
