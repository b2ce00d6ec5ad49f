"""Re-pose MediaPipe face landmarks in 3D: yaw, pitch and roll about the face centre, then scale and shift.

Lets a user set FaceCrafter's pose with sliders instead of a pose photo. Coordinates: x right and
y down in the image, z into the screen (MediaPipe: smaller z is nearer the camera; z uses the scale
of x, i.e. image widths). Rotation happens in pixels, so a non-square frame keeps the face's shape.

Angle conventions (degrees, seen by the viewer):
- yaw > 0 turns the face toward the image's right (the nose, nearer than the centre, moves to +x);
- pitch > 0 tilts the face up (the nose moves to -y);
- roll > 0 turns the face counter-clockwise in the picture (a point right of the centre moves up).
Applied in the order yaw, pitch, roll.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .expressions import Landmarks


def rotation_matrix(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    """3 x 3 matrix acting on column vectors (dx, dy, dz) in the conventions above."""
    for name, value in (("yaw", yaw), ("pitch", pitch), ("roll", roll)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of degrees; got {value}")
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    yaw_m = torch.tensor([[math.cos(y), 0.0, -math.sin(y)], [0.0, 1.0, 0.0], [math.sin(y), 0.0, math.cos(y)]], dtype=torch.float64)
    pitch_m = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(p), math.sin(p)], [0.0, -math.sin(p), math.cos(p)]], dtype=torch.float64)
    roll_m = torch.tensor([[math.cos(r), math.sin(r), 0.0], [-math.sin(r), math.cos(r), 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return roll_m @ pitch_m @ yaw_m


@dataclass
class PosedLandmarks:
    landmarks: Landmarks
    outside: list[int]  # per row: how many of the 478 points left the frame

    def report(self) -> str:
        lines = [f"image {i + 1}: {n} of {self.landmarks.values.shape[1]} points outside the frame"
                 for i, n in enumerate(self.outside) if n]
        return "\n".join(lines) if lines else "all points inside the frame"


def pose_landmarks(landmarks: Landmarks, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0,
                   scale: float = 1.0, shift_x: float = 0.0, shift_y: float = 0.0) -> PosedLandmarks:
    """Each row rotated about its own centre (mean of its points), scaled about it, then shifted.

    ``shift_x``/``shift_y`` are fractions of the frame's width/height. Points may leave the frame;
    they are kept (a drawing clips them) and counted per row.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number; got {scale}")
    for name, value in (("shift_x", shift_x), ("shift_y", shift_y)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite; got {value}")
    height, width = landmarks.image_size or (1, 1)
    to_pixels = torch.tensor([float(width), float(height), float(width)], dtype=torch.float64)
    points = landmarks.values.to(torch.float64) * to_pixels
    centre = points.mean(dim=1, keepdim=True)
    moved = (points - centre) @ rotation_matrix(yaw, pitch, roll).T * scale + centre
    moved = moved / to_pixels + torch.tensor([shift_x, shift_y, 0.0], dtype=torch.float64)
    values = moved.to(landmarks.values.dtype)
    inside = ((values[..., :2] >= 0) & (values[..., :2] <= 1)).all(dim=-1)
    return PosedLandmarks(Landmarks(values, image_size=landmarks.image_size), (~inside).sum(dim=1).tolist())


def pose_sweep(landmarks: Landmarks, frames: int, start: tuple[float, float, float], end: tuple[float, float, float],
               scale: float = 1.0, shift_x: float = 0.0, shift_y: float = 0.0) -> PosedLandmarks:
    """``frames`` rows, the (yaw, pitch, roll) of frame i going linearly from ``start`` to ``end``.

    ``landmarks`` has one row (the same face in every frame) or one row per frame.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1; got {frames}")
    rows = landmarks.rows_for(frames)
    posed, outside = [], []
    for i in range(frames):
        t = i / (frames - 1) if frames > 1 else 0.0
        angles = [a + (b - a) * t for a, b in zip(start, end)]
        one = pose_landmarks(Landmarks(rows[i:i + 1], image_size=landmarks.image_size), *angles, scale, shift_x, shift_y)
        posed.append(one.landmarks.values)
        outside += one.outside
    return PosedLandmarks(Landmarks(torch.cat(posed), image_size=landmarks.image_size), outside)
