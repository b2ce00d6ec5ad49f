"""Landmark images for FaceCrafter's landmark control module: the MediaPipe face contours
(face oval, brows, eyes, irises, nose, lips) drawn as coloured lines on black.

Colours are fixed per region (:data:`PALETTES`, RGB):
- "regions" (default): every region its own colour, MediaPipe's second contour style
  (lips blue, left eye cyan, left brow green, right eye magenta, right brow red, oval white,
  nose yellow) plus peach/purple irises;
- "mediapipe": MediaPipe's default contour style (subject's left side green, right side red,
  lips, oval and nose light grey).
Lines are drawn with OpenCV (8-connected, sub-pixel endpoints), so output is deterministic.
``mesh=True`` adds the full triangulation in grey underneath (needs the mediapipe package).

``fit`` "image": landmark (x, y) map to (x * width, y * height) of the canvas, i.e. the canvas
is the photo the landmarks came from (resized). "face": the face is centred in the canvas, the
square ``face_scale`` x mean(w, h) around the landmarks filling the shorter side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .expressions import Landmarks
from .face_mesh import REGION_POLYLINES, REGIONS, tesselation_edges
from .optional import require

PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "regions": {
        "face_oval": (224, 224, 224),
        "right_eyebrow": (255, 48, 48),
        "left_eyebrow": (48, 255, 48),
        "right_eye": (255, 48, 192),
        "left_eye": (48, 255, 192),
        "right_iris": (255, 229, 180),
        "left_iris": (128, 64, 128),
        "nose": (255, 204, 0),
        "lips": (21, 101, 192),
    },
    "mediapipe": {
        "face_oval": (224, 224, 224),
        "right_eyebrow": (255, 48, 48),
        "left_eyebrow": (48, 255, 48),
        "right_eye": (255, 48, 48),
        "left_eye": (48, 255, 48),
        "right_iris": (255, 48, 48),
        "left_iris": (48, 255, 48),
        "nose": (224, 224, 224),
        "lips": (224, 224, 224),
    },
}
MESH_COLOUR = (128, 128, 128)
POINT_COLOUR = (255, 255, 255)
_SHIFT = 4  # OpenCV fixed-point bits for sub-pixel line ends


def default_thickness(height: int, width: int) -> int:
    """2 px at 512, scaled with the canvas, at least 1."""
    return max(1, round(min(height, width) / 256))


def draw_face(canvas: np.ndarray, points_px, regions: Sequence[str] = REGIONS, palette: str = "regions",
              thickness: int | None = None, mesh: bool = False, points: bool = False,
              point_radius: int | None = None) -> np.ndarray:
    """Draw one face's contours on ``canvas`` (H x W x 3 uint8 RGB, modified in place and returned).

    ``points_px``: 478 x 2 pixel coordinates in the canvas.
    """
    cv2 = require("cv2", "Drawing face landmarks")
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; known: {', '.join(PALETTES)}")
    for region in regions:
        if region not in REGION_POLYLINES:
            raise ValueError(f"unknown face region {region!r}; known: {', '.join(REGIONS)}")
    height, width = canvas.shape[:2]
    thickness = default_thickness(height, width) if thickness is None else int(thickness)
    fixed = np.round(np.asarray(points_px, dtype=np.float64)[:, :2] * (1 << _SHIFT)).astype(np.int64)
    fixed = np.clip(fixed, -(1 << 24), 1 << 24)

    def line(a: int, b: int, colour, width_px: int) -> None:
        cv2.line(canvas, (int(fixed[a, 0]), int(fixed[a, 1])), (int(fixed[b, 0]), int(fixed[b, 1])),
                 colour, width_px, cv2.LINE_8, _SHIFT)

    if mesh:
        for a, b in tesselation_edges():
            line(a, b, MESH_COLOUR, max(1, thickness // 2))
    colours = PALETTES[palette]
    for region in regions:
        for polyline in REGION_POLYLINES[region]:
            for a, b in zip(polyline[:-1], polyline[1:]):
                line(a, b, colours[region], thickness)
    if points:
        radius = max(1, thickness) if point_radius is None else int(point_radius)
        for x, y in fixed:
            cv2.circle(canvas, (int(x), int(y)), radius << _SHIFT, POINT_COLOUR, -1, cv2.LINE_8, _SHIFT)
    return canvas


def canvas_points(landmarks: torch.Tensor, height: int, width: int, fit: str = "image",
                  face_scale: float = 1.6, source_size: Sequence[int] | None = None) -> torch.Tensor:
    """Pixel positions (B x 478 x 2) of normalised landmarks (B x 478 x 3) on a height x width canvas."""
    if fit == "image":
        return landmarks[..., :2] * torch.tensor([float(width), float(height)])
    if fit != "face":
        raise ValueError(f"fit must be 'image' or 'face'; got {fit!r}")
    # work in source pixels so the face keeps its aspect ratio
    src_h, src_w = (source_size if source_size is not None else (height, width))
    px = landmarks[..., :2] * torch.tensor([float(src_w), float(src_h)])
    low, high = px.amin(dim=1, keepdim=True), px.amax(dim=1, keepdim=True)
    centre = (low + high) / 2
    side = (high - low).mean(dim=2, keepdim=True).clamp(min=1e-6) * float(face_scale)
    factor = min(height, width) / side
    return (px - centre) * factor + torch.tensor([width / 2.0, height / 2.0])


def render_landmark_image(landmarks: Landmarks, height: int = 512, width: int = 512, *,
                          regions: Sequence[str] = REGIONS, palette: str = "regions",
                          thickness: int | None = None, fit: str = "image", face_scale: float = 1.6,
                          mesh: bool = False, points: bool = False, batch_size: int | None = None) -> torch.Tensor:
    """FaceCrafter landmark image(s): B x height x width x 3 float (0..1), contours on black."""
    if not isinstance(landmarks, Landmarks):
        landmarks = Landmarks(landmarks)
    rows = landmarks.rows_for(batch_size) if batch_size else landmarks.values
    placed = canvas_points(rows, height, width, fit=fit, face_scale=face_scale, source_size=landmarks.image_size)
    images = []
    for i in range(rows.shape[0]):
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        draw_face(canvas, placed[i].numpy(), regions=regions, palette=palette, thickness=thickness,
                  mesh=mesh, points=points)
        images.append(torch.from_numpy(canvas))
    return torch.stack(images).to(torch.float32) / 255.0


def resize_landmark_images(images: torch.Tensor, size: int) -> tuple[torch.Tensor, bool]:
    """ComfyUI IMAGE (B, H, W, 3, 0..1) -> (B, 3, size, size); True when it had to be resized."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"a landmark image must be an RGB IMAGE batch (B, H, W, 3); got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("the landmark image has NaN or infinite values")
    chw = images.permute(0, 3, 1, 2).float()
    if tuple(chw.shape[2:]) == (size, size):
        return chw, False
    # area keeps thin contour lines visible when shrinking; bilinear when enlarging
    mode = "area" if min(chw.shape[2:]) > size else "bilinear"
    return F.interpolate(chw, size=(size, size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {})), True


def blank_rows(images: torch.Tensor) -> list[int]:
    """0-based rows of a (B, ...) image batch with nothing drawn (all black)."""
    return [i for i in range(images.shape[0]) if float(images[i].max()) <= 0.0]
