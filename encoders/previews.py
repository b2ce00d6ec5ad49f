"""Preview images (B x H x W x 3 float tensors, 0..1, ComfyUI IMAGE layout) drawn with OpenCV:
landmarks over the photo, a blendshape bar chart, a FLAME parameter chart and an emotion chart.
(The SMIRK crop and the EmojiDiff local image are previews by themselves: see
:mod:`encoders.face_crops`.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .expressions import EMOTION_CLASSES, ArkitBlendshapes, Emotion, FlameExpression, Landmarks
from .face_crops import to_image_batch
from .face_mesh import REGIONS
from .landmark_image import default_thickness, draw_face
from .optional import require

BACKGROUND = (28, 28, 32)
GRID = (70, 70, 78)
TEXT = (235, 235, 235)
MUTED = (160, 160, 170)
BAR = (90, 170, 255)
BAR_NEGATIVE = (255, 120, 90)
EYELID = (120, 220, 120)
JAW = (255, 190, 80)
FONT_SCALE = 0.4
MAX_CHART_PIXELS = 64 << 20  # per chart node run: 64 Mpx is 768 MB as a float32 IMAGE batch
logger = logging.getLogger(__name__)


def rows_to_draw(rows: int, width: int, height: int, what: str) -> int:
    """How many of ``rows`` charts of ``width`` x ``height`` fit the pixel budget; the rest are left out, said once
    in the log (a 4,096-frame animation at 2,048 x 1,024 would be a 103 GB tensor)."""
    fits = max(1, MAX_CHART_PIXELS // (width * height))
    if rows > fits:
        logger.warning("%s: drawing the first %d of %d rows (%d x %d each: at most %d Mpx in all); lower the size "
                       "or chart fewer rows", what, fits, rows, width, height, MAX_CHART_PIXELS >> 20)
    return min(rows, fits)


def _cv2():
    return require("cv2", "Expression previews")


def _to_tensor(canvases: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(canvases)).to(torch.float32) / 255.0


def _text(canvas, text: str, x: int, y: int, colour=TEXT, scale: float = FONT_SCALE) -> None:
    cv2 = _cv2()
    cv2.putText(canvas, text, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def landmarks_overlay(images, landmarks: Landmarks, regions: Sequence[str] = REGIONS, palette: str = "regions",
                      points: bool = True, thickness: int | None = None) -> torch.Tensor:
    """The face contours (and landmark dots) drawn over each photo.

    One image with several landmark rows (several faces of one picture) gives one image with all
    the faces drawn; otherwise rows pair with images (one row serves every image).
    """
    images = to_image_batch(images)
    batch, height, width, _ = images.shape
    if not isinstance(landmarks, Landmarks):
        landmarks = Landmarks(landmarks)
    if batch == 1 and len(landmarks) > 1:
        faces_per_image = [landmarks.values]
    else:
        faces_per_image = [row.unsqueeze(0) for row in landmarks.rows_for(batch)]
    thickness = max(1, default_thickness(height, width) // 2) if thickness is None else thickness
    scale = torch.tensor([float(width), float(height)])
    canvases = []
    for i in range(batch):
        canvas = (images[i] * 255).round().clamp(0, 255).to(torch.uint8).numpy().copy()
        for face in faces_per_image[i]:
            draw_face(canvas, (face[:, :2] * scale).numpy(), regions=regions, palette=palette,
                      thickness=thickness, points=points, point_radius=1)
        canvases.append(canvas)
    return _to_tensor(canvases)


def blendshape_chart(blendshapes: ArkitBlendshapes, width: int = 512, row_height: int = 14) -> torch.Tensor:
    """Horizontal bars of the 52 blendshape scores (0..1), one chart per row of the batch."""
    cv2 = _cv2()
    label_w, value_w, margin = 150, 44, 8
    height = 2 * margin + row_height * len(blendshapes.names) + 16
    bar_x0, bar_x1 = label_w, width - value_w
    if bar_x1 - bar_x0 < 20:
        raise ValueError(f"blendshape chart width {width} is too small (at least {label_w + value_w + 20})")
    canvases = []
    for row in blendshapes.values[:rows_to_draw(len(blendshapes.values), width, height, "Blendshape Chart")]:
        canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        _text(canvas, "ARKit blendshapes (0..1)", margin, margin + 8, MUTED)
        for frac in (0.25, 0.5, 0.75, 1.0):
            x = int(bar_x0 + frac * (bar_x1 - bar_x0))
            cv2.line(canvas, (x, margin + 14), (x, height - margin), GRID, 1)
        for j, name in enumerate(blendshapes.names):
            y = margin + 16 + j * row_height
            score = float(row[j])
            _text(canvas, name, margin, y + row_height - 4, TEXT if score >= 0.05 else MUTED)
            x_end = int(round(bar_x0 + score * (bar_x1 - bar_x0)))
            if x_end > bar_x0:
                cv2.rectangle(canvas, (bar_x0, y + 2), (x_end, y + row_height - 2), BAR, -1)
            _text(canvas, f"{score:.2f}", bar_x1 + 4, y + row_height - 4, MUTED)
        canvases.append(canvas)
    return _to_tensor(canvases)


def _vertical_bars(canvas, values: Sequence[float], x0: int, x1: int, y0: int, y1: int, limit: float,
                   colour, negative_colour, title: str, signed: bool = True) -> None:
    cv2 = _cv2()
    cv2.rectangle(canvas, (x0, y0), (x1, y1), GRID, 1)
    _text(canvas, title, x0, y0 - 6, MUTED)
    zero_y = (y0 + y1) // 2 if signed else y1
    cv2.line(canvas, (x0, zero_y), (x1, zero_y), GRID, 1)
    _text(canvas, f"{limit:g}", x1 + 3, y0 + 8, MUTED)
    if signed:
        _text(canvas, f"-{limit:g}", x1 + 3, y1, MUTED)
    _text(canvas, "0", x1 + 3, zero_y + 4, MUTED)
    n = len(values)
    slot = (x1 - x0) / max(n, 1)
    half = (y1 - y0) / 2 if signed else (y1 - y0)
    for j, v in enumerate(values):
        fraction = max(-1.0, min(1.0, float(v) / limit))
        top = int(round(zero_y - fraction * half))
        left = int(round(x0 + j * slot + 1))
        right = max(left, int(round(x0 + (j + 1) * slot - 2)))
        if top != zero_y:
            cv2.rectangle(canvas, (left, min(top, zero_y)), (right, max(top, zero_y)),
                          colour if v >= 0 else negative_colour, -1)


def flame_chart(expression: FlameExpression, width: int = 768, height: int = 300,
                limit: float | None = None) -> torch.Tensor:
    """Bars of the 55 FLAME parameters in three panels: expression (50, +-limit), eyelids (0..1)
    and jaw (+-0.5 rad). ``limit`` defaults to max(3, the largest |expression| value)."""
    top, bottom, margin = 34, height - 24, 10
    if width < 300 or height < 120:
        raise ValueError(f"FLAME chart needs at least 300 x 120 pixels; got {width} x {height}")
    expr_x1 = int(width * 0.68)
    lid_x0, lid_x1 = expr_x1 + 40, expr_x1 + 40 + int(width * 0.07)
    jaw_x0, jaw_x1 = lid_x1 + 40, width - 36
    canvases = []
    for row in expression.values[:rows_to_draw(len(expression.values), width, height, "FLAME Chart")]:
        canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        _text(canvas, "FLAME expression parameters", margin, 14, TEXT)
        expr = row[:50].tolist()
        scale = limit if limit is not None else max(3.0, max(abs(v) for v in expr))
        _vertical_bars(canvas, expr, margin, expr_x1, top, bottom, scale, BAR, BAR_NEGATIVE, "expression 1-50")
        for k in (0, 9, 19, 29, 39, 49):
            _text(canvas, str(k + 1), int(margin + (k + 0.2) * (expr_x1 - margin) / 50), bottom + 14, MUTED)
        _vertical_bars(canvas, row[50:52].tolist(), lid_x0, lid_x1, top, bottom, 1.0, EYELID, EYELID,
                       "eyelids", signed=False)
        _text(canvas, "L  R", lid_x0 + 2, bottom + 14, MUTED)
        _vertical_bars(canvas, row[52:55].tolist(), jaw_x0, jaw_x1, top, bottom, 0.5, JAW, BAR_NEGATIVE, "jaw")
        _text(canvas, "open side twist", jaw_x0, bottom + 14, MUTED, 0.33)
        canvases.append(canvas)
    return _to_tensor(canvases)


def emotion_chart(emotion: Emotion, width: int = 512, height: int = 220) -> torch.Tensor:
    """Class probabilities as bars, and valence/arousal as a point in the circumplex."""
    cv2 = _cv2()
    margin = 10
    plot = min(height - 2 * margin - 16, width // 2 - margin)
    cx, cy = width - margin - plot // 2, margin + 16 + plot // 2
    bar_x0, bar_x1 = 80, width - plot - 3 * margin - 40
    row_h = (height - 2 * margin - 16) // len(EMOTION_CLASSES)
    canvases = []
    for row in emotion.values[:rows_to_draw(len(emotion.values), width, height, "Emotion Chart")]:
        canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        _text(canvas, "emotion", margin, margin + 6, MUTED)
        for j, name in enumerate(EMOTION_CLASSES):
            y = margin + 16 + j * row_h
            p = float(row[2 + j])
            _text(canvas, name, margin, y + row_h - 4)
            x_end = int(round(bar_x0 + p * (bar_x1 - bar_x0)))
            cv2.rectangle(canvas, (bar_x0, y + 2), (bar_x1, y + row_h - 2), GRID, 1)
            if x_end > bar_x0:
                cv2.rectangle(canvas, (bar_x0, y + 2), (x_end, y + row_h - 2), BAR, -1)
            _text(canvas, f"{p:.2f}", bar_x1 + 4, y + row_h - 4, MUTED)
        radius = plot // 2
        cv2.circle(canvas, (cx, cy), radius, GRID, 1, cv2.LINE_AA)
        cv2.line(canvas, (cx - radius, cy), (cx + radius, cy), GRID, 1)
        cv2.line(canvas, (cx, cy - radius), (cx, cy + radius), GRID, 1)
        _text(canvas, "valence", cx + radius - 46, cy + 14, MUTED, 0.35)
        _text(canvas, "arousal", cx + 4, cy - radius + 10, MUTED, 0.35)
        px = int(round(cx + float(row[0]) * radius))
        py = int(round(cy - float(row[1]) * radius))
        cv2.circle(canvas, (px, py), 5, JAW, -1, cv2.LINE_AA)
        _text(canvas, f"V {float(row[0]):+.2f}  A {float(row[1]):+.2f}", cx - radius, height - 4, TEXT, 0.35)
        canvases.append(canvas)
    return _to_tensor(canvases)


def score_table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[float]]], width: int = 512,
                row_height: int = 20) -> torch.Tensor:
    """A small table of numbers (one IMAGE): a header row, then one labelled row per entry."""
    canvas = np.full((row_height * (len(rows) + 1) + 8, width, 3), BACKGROUND, dtype=np.uint8)
    column_width = width // (len(columns) + 1)
    for j, name in enumerate(columns):
        _text(canvas, name, (j + 1) * column_width + 4, row_height - 5, MUTED)
    for i, (label, values) in enumerate(rows, start=1):
        y = (i + 1) * row_height - 5
        _text(canvas, label, 6, y, MUTED)
        for j, value in enumerate(values):
            _text(canvas, f"{value:.4f}", (j + 1) * column_width + 4, y)
    return _to_tensor([canvas])
