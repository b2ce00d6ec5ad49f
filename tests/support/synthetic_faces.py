"""A schematic frontal face as 478 MediaPipe landmarks, for tests of crops, masks and renderers."""

from __future__ import annotations

import math

import torch

from encoders.face_mesh import REGION_POLYLINES

# normalised coordinates: region -> (centre x, centre y, radius x, radius y)
LAYOUT = {
    "face_oval": (0.5, 0.5, 0.3, 0.4),
    "right_eye": (0.38, 0.42, 0.06, 0.025),
    "left_eye": (0.62, 0.42, 0.06, 0.025),
    "right_eyebrow": (0.38, 0.34, 0.08, 0.02),
    "left_eyebrow": (0.62, 0.34, 0.08, 0.02),
    "right_iris": (0.38, 0.42, 0.015, 0.015),
    "left_iris": (0.62, 0.42, 0.015, 0.015),
    "nose": (0.5, 0.52, 0.04, 0.08),
    "lips": (0.5, 0.66, 0.1, 0.035),
}
CHEEK = (0.36, 0.58)


def synthetic_face() -> torch.Tensor:
    """478 x 3 landmarks: each region's points spread around its ellipse, iris centres in place, the rest at the nose."""
    points = torch.zeros(478, 3)
    points[:, 0], points[:, 1] = 0.5, 0.52
    for region, (cx, cy, rx, ry) in LAYOUT.items():
        indices = list(dict.fromkeys(i for line in REGION_POLYLINES[region] for i in line))
        for k, index in enumerate(indices):
            angle = 2 * math.pi * k / len(indices)
            points[index, 0] = cx + rx * math.cos(angle)
            points[index, 1] = cy + ry * math.sin(angle)
    points[468, :2] = torch.tensor(LAYOUT["right_iris"][:2])
    points[473, :2] = torch.tensor(LAYOUT["left_iris"][:2])
    return points
