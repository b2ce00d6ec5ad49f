"""Core ComfyUI's face landmarks (``FACE_LANDMARKS`` of "Detect Face Landmarks (MediaPipe)", ComfyUI 0.38+)
read as our :class:`~encoders.face_landmarks.FaceLandmarkerResult`.

Core's value is plain data, so this works on any ComfyUI version::

    {"frames": [per image: a list of faces], "image_size": (height, width), "connection_sets": {...}}

and each face a dict with ``landmarks_xy`` (478 x 2, pixels), ``landmarks_3d`` (478 x 3, the landmark
model's own crop units), ``blendshapes`` ({ARKit name: score}), ``bbox_xyxy``, ``score``, ``presence`` and
``transformation_matrix`` (4 x 4).

- x, y: ``landmarks_xy`` divided by the image's width and height, as MediaPipe normalises them.
- z: MediaPipe gives depth in the units of x (image widths). Core's depth is only in ``landmarks_3d``,
  whose units are the landmark model's crop. The crop maps onto the picture by a similarity (scale,
  in-plane rotation, shift): we fit it from ``landmarks_3d``'s x, y to ``landmarks_xy`` (least squares,
  Umeyama), and scale z by the same factor, then divide by the width.
- blendshapes by name; names not given are 0.
- faces: ordered largest first by the area of ``bbox_xyxy`` (of the landmarks where a face has none), as
  our Face Landmarks node orders them; ``face_index`` picks one.
- a frame without face number ``face_index`` stops with :class:`NoFaceFound` naming the frames; our own
  Face Landmarks node can instead reuse the previous frame's face (``on_missing="previous"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .expressions import ARKIT_BLENDSHAPE_INDEX, ArkitBlendshapes, Landmarks
from .face_landmarks import FaceLandmarkerResult, NoFaceFound

POINTS = 478


def is_core_face_landmarks(value) -> bool:
    return isinstance(value, Mapping) and "frames" in value and "image_size" in value


def _array(face: Mapping, key: str, shape: tuple[int, ...], frame: int) -> np.ndarray:
    if key not in face:
        raise ValueError(f"core face landmarks: a face of frame {frame + 1} has no '{key}'")
    values = np.asarray(face[key], dtype=np.float64)
    if values.shape != shape:
        raise ValueError(f"core face landmarks: '{key}' of frame {frame + 1} has shape {values.shape}; expected {shape} "
                         "(FaceMesh with irises)")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"core face landmarks: '{key}' of frame {frame + 1} holds NaN or infinite values")
    return values


def _area(face: Mapping, frame: int) -> float:
    box = face.get("bbox_xyxy")
    if box is None:
        points = _array(face, "landmarks_xy", (POINTS, 2), frame)
        box = (*points.min(0), *points.max(0))
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def similarity_scale(source: np.ndarray, target: np.ndarray) -> float:
    """The scale of the least-squares similarity (rotation, scale, shift) taking N x 2 ``source`` onto
    ``target`` (Umeyama 1991, eq. 42: trace(D S) / source variance)."""
    source = source - source.mean(0)
    target = target - target.mean(0)
    variance = float((source**2).sum())
    if variance == 0.0:
        raise ValueError("core face landmarks: 'landmarks_3d' has all points at one place")
    singular = np.linalg.svd(target.T @ source, compute_uv=False)
    sign = 1.0 if np.linalg.det(target.T @ source) >= 0 else -1.0
    return float((singular[0] + sign * singular[1]) / variance)


def _face_rows(face: Mapping, height: int, width: int, frame: int):
    xy = _array(face, "landmarks_xy", (POINTS, 2), frame)
    points_3d = _array(face, "landmarks_3d", (POINTS, 3), frame)
    depth = points_3d[:, 2] * similarity_scale(points_3d[:, :2], xy) / width
    landmarks = np.column_stack([xy[:, 0] / width, xy[:, 1] / height, depth])
    blendshapes = np.zeros(len(ARKIT_BLENDSHAPE_INDEX))
    for name, score in dict(face.get("blendshapes") or {}).items():
        if name not in ARKIT_BLENDSHAPE_INDEX:
            raise ValueError(f"core face landmarks: unknown blendshape name {name!r} in frame {frame + 1}")
        blendshapes[ARKIT_BLENDSHAPE_INDEX[name]] = float(score)
    matrix = face.get("transformation_matrix")
    matrix = np.eye(4) if matrix is None else _array(face, "transformation_matrix", (4, 4), frame)
    return landmarks, np.clip(blendshapes, 0.0, 1.0), matrix


def _frames(value: Mapping) -> tuple[tuple[int, int], list]:
    if not is_core_face_landmarks(value):
        raise ValueError("core face landmarks: expected a dict with 'frames' and 'image_size' (the output of "
                         "Detect Face Landmarks (MediaPipe))")
    size = tuple(int(v) for v in value["image_size"])
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"core face landmarks: image_size must be (height, width), positive; got {value['image_size']}")
    frames = list(value["frames"])
    if not frames:
        raise ValueError("core face landmarks: no frames")
    return size, frames


def _frame_rows(faces, frame: int, face_index: int, size: tuple[int, int]):
    """Face ``face_index`` (largest first) of one frame as our rows, or None when the frame has fewer faces."""
    faces = list(faces or [])
    order = sorted(range(len(faces)), key=lambda i: -_area(faces[i], frame))
    return _face_rows(faces[order[face_index]], *size, frame) if face_index < len(order) else None


def _result(rows: list, size: tuple[int, int]) -> FaceLandmarkerResult:
    stack = [torch.from_numpy(np.stack([row[k] for row in rows])).float() for k in range(3)]
    return FaceLandmarkerResult(Landmarks(stack[0], image_size=size), ArkitBlendshapes(stack[1]), stack[2],
                                [True] * len(rows))


def _rows_per_frame(value: Mapping, face_index: int) -> tuple[tuple[int, int], list]:
    """The image size and, per frame, face ``face_index``'s rows (None where the frame has fewer faces)."""
    size, frames = _frames(value)
    return size, [_frame_rows(faces, frame, face_index, size) for frame, faces in enumerate(frames)]


def read_core_face_landmarks(value: Mapping, face_index: int = 0) -> FaceLandmarkerResult:
    """Our landmarks, blendshapes and matrices, one row per frame of core's ``FACE_LANDMARKS``."""
    size, rows = _rows_per_frame(value, face_index)
    missing = [frame + 1 for frame, row in enumerate(rows) if row is None]
    if missing:
        raise NoFaceFound(f"no face {face_index} (largest first, from 0) in frame(s) {missing} of the face landmarks "
                          f"(of {len(rows)}, counting from 1). For video with dropped frames, use our Face Landmarks "
                          "node with on_missing = previous")
    return _result(rows, size)


def read_each(value: Mapping, face_index: int = 0) -> list[FaceLandmarkerResult | None]:
    """One single-frame result per frame, None where the frame has no face ``face_index`` (as
    ``FaceLandmarker.detect_each``: scoring generated pictures, where a failed one has no face)."""
    size, rows = _rows_per_frame(value, face_index)
    return [None if row is None else _result([row], size) for row in rows]


def as_landmarks(value, face_index: int = 0) -> Landmarks:
    """Our landmarks as they are; core's ``FACE_LANDMARKS`` converted (face ``face_index`` of each frame, largest first)."""
    return read_core_face_landmarks(value, face_index).landmarks if is_core_face_landmarks(value) else value


def as_blendshapes(value) -> ArkitBlendshapes:
    """Our blendshapes as they are; those of core's ``FACE_LANDMARKS`` (the largest face of each frame)."""
    return read_core_face_landmarks(value).blendshapes if is_core_face_landmarks(value) else value
