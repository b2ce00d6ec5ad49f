"""Face crops computed from MediaPipe landmarks: the SMIRK input crop and EmojiDiff's "local image".

Images are ComfyUI-style float tensors B x H x W x 3 in 0..1 (numpy arrays, uint8 and single
images are accepted and converted). Landmarks are :class:`~encoders.expressions.Landmarks`
(x, y normalised to the image): one row per image, one row for all images, or several rows for
one image (several faces of one picture: one crop per face).

SMIRK crop (as in SMIRK's demo): the landmarks' bounding box (w, h) and centre give a square of
side ``int(1.4 * (w + h) / 2)`` pixels centred on the box; it is mapped by a similarity
transform onto ``size x size`` pixels (its corners to pixel centres 0 and size-1) with bilinear
sampling and black outside the image; values stay 0..1 with no mean/std normalisation.

EmojiDiff local image (paper sec. 3.2: "the local image is preprocessed from the origin
expression reference, which removes irrelevant elements such as the background, face contour"):
a mask that keeps the eyes with their brows and irises, the nose and the mouth (each the convex
hull of its landmarks, dilated by a fraction of the face size, optionally feathered) multiplies
the image, the rest is filled with ``fill``; then a square around the kept parts is resized for
CLIP vision (224).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .expressions import Landmarks
from .face_mesh import LIPS_OUTER, region_points
from .optional import require


def to_image_batch(images) -> torch.Tensor:
    """Any image(s) as a float32 tensor B x H x W x 3 in 0..1 (uint8 is divided by 255)."""
    if isinstance(images, np.ndarray):
        is_uint8 = images.dtype == np.uint8
        images = torch.from_numpy(np.ascontiguousarray(images))
    else:
        images = torch.as_tensor(images)
        is_uint8 = images.dtype == torch.uint8
    images = images.detach().cpu().to(torch.float32)
    if is_uint8:
        images = images / 255.0
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"expected images B x H x W x C; got shape {tuple(images.shape)}")
    if images.shape[-1] == 4:
        images = images[..., :3]
    elif images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    if images.shape[-1] != 3:
        raise ValueError(f"expected 1, 3 or 4 colour channels last; got shape {tuple(images.shape)}")
    return images


def pair_images_landmarks(images, landmarks: Landmarks) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B x H x W x 3) and landmark rows of equal batch: one row serves every image, and
    one image serves every row (several faces of one picture)."""
    images = to_image_batch(images)
    if not isinstance(landmarks, Landmarks):
        landmarks = Landmarks(landmarks)
    if images.shape[0] == 1 and len(landmarks) > 1:
        images = images.expand(len(landmarks), -1, -1, -1)
    return images, landmarks.rows_for(images.shape[0])


class SquareBox(NamedTuple):
    """A square in source pixels: centre (cx, cy) and side, per image (tensors of length B)."""

    cx: torch.Tensor
    cy: torch.Tensor
    side: torch.Tensor


def landmark_square(points_px: torch.Tensor, scale: float, integer_side: bool = True) -> SquareBox:
    """Square centred on the bounding box of ``points_px`` (B x N x 2), side ``scale * mean(w, h)``."""
    points_px = points_px.double()  # float64 like SMIRK's numpy code (int(1.4 * 180) is 251 there)
    low = points_px.amin(dim=1)
    high = points_px.amax(dim=1)
    centre = (low + high) / 2
    side = (high - low).mean(dim=1) * float(scale)
    if integer_side:
        side = side.floor()
    return SquareBox(centre[:, 0].float(), centre[:, 1].float(), side.clamp(min=1.0).float())


def crop_matrix(box: SquareBox, size: int) -> torch.Tensor:
    """B x 2 x 3 affine matrices mapping source pixels to crop pixels (square corners -> 0, size-1)."""
    factor = (size - 1) / box.side
    x0 = box.cx - box.side / 2
    y0 = box.cy - box.side / 2
    zeros = torch.zeros_like(factor)
    return torch.stack([
        torch.stack([factor, zeros, -x0 * factor], dim=1),
        torch.stack([zeros, factor, -y0 * factor], dim=1),
    ], dim=1)


def transform_points(points_px: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply B x 2 x 3 affine matrices to B x N x 2 points."""
    return points_px @ matrix[:, :, :2].transpose(1, 2) + matrix[:, :, 2].unsqueeze(1)


def warp_square(images: torch.Tensor, box: SquareBox, size: int, antialias: bool = False,
                fill: float = 0.0) -> torch.Tensor:
    """Sample the square ``box`` of each image (B x H x W x C) onto ``size x size`` pixels, bilinearly.

    ``antialias`` first low-pass resizes an image whose square is much larger than ``size``
    (SMIRK's own preprocessing does not; EmojiDiff/EmoNet crops do).
    """
    batch, height, width, _ = images.shape
    outputs = []
    for i in range(batch):
        image = images[i].permute(2, 0, 1).unsqueeze(0)
        cx, cy, side = float(box.cx[i]), float(box.cy[i]), float(box.side[i])
        src_h, src_w = height, width
        if antialias and side > 1.5 * size:
            factor = size / side
            src_h, src_w = max(1, round(height * factor)), max(1, round(width * factor))
            image = F.interpolate(image, size=(src_h, src_w), mode="bilinear", antialias=True, align_corners=False)
            # pixel centre convention: x_small = (x + 0.5) * (src_w / width) - 0.5
            sx, sy = src_w / width, src_h / height
            cx, cy, side = (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5, side * sx
        steps = torch.arange(size, dtype=torch.float32) * (side / max(size - 1, 1))
        xs = cx - side / 2 + steps
        ys = cy - side / 2 + steps
        gx = 2 * xs / max(src_w - 1, 1) - 1
        gy = 2 * ys / max(src_h - 1, 1) - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).unsqueeze(0)
        if fill:
            image = image - fill
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        if fill:
            sampled = sampled + fill
        outputs.append(sampled[0].permute(1, 2, 0))
    return torch.stack(outputs).clamp(0.0, 1.0)


class Crop(NamedTuple):
    """Cropped images (B x size x size x 3), the squares used, and the source->crop matrices."""

    images: torch.Tensor
    box: SquareBox
    matrix: torch.Tensor


def landmark_square_crop(images, landmarks: Landmarks, scale: float = 1.4, size: int = 224,
                         antialias: bool = False, integer_side: bool = True) -> Crop:
    """Square crop around all 478 landmarks of each image (see module docstring)."""
    images, rows = pair_images_landmarks(images, landmarks)
    batch, height, width, _ = images.shape
    points = rows[..., :2] * torch.tensor([float(width), float(height)])
    box = landmark_square(points, scale, integer_side=integer_side)
    return Crop(warp_square(images, box, size, antialias=antialias), box, crop_matrix(box, size))


def smirk_crop(images, landmarks: Landmarks, scale: float = 1.4, size: int = 224) -> Crop:
    """SMIRK's input crop: square 1.4 x mean(w, h) around the landmarks, 224 x 224, 0..1, RGB."""
    return landmark_square_crop(images, landmarks, scale=scale, size=size, antialias=False, integer_side=True)


# --- EmojiDiff local image ------------------------------------------------------------------

# the kept parts: each is one convex hull
LOCAL_PARTS: dict[str, tuple[int, ...]] = {
    "right_eye": tuple(sorted(set(region_points("right_eye")) | set(region_points("right_eyebrow"))
                              | set(region_points("right_iris")) | {468})),
    "left_eye": tuple(sorted(set(region_points("left_eye")) | set(region_points("left_eyebrow"))
                             | set(region_points("left_iris")) | {473})),
    "nose": tuple(region_points("nose")),
    "mouth": tuple(sorted(LIPS_OUTER)),
}


def _face_size(points_px: np.ndarray) -> float:
    extent = points_px.max(axis=0) - points_px.min(axis=0)
    return float(max(extent.mean(), 1.0))


def local_expression_mask(points_px, height: int, width: int, mode: str = "parts",
                          dilation: float = 0.04, feather: float = 0.0,
                          parts: Sequence[str] | None = None) -> np.ndarray:
    """H x W float mask (0..1) keeping the eyes+brows, nose and mouth of one face.

    ``points_px``: 478 x 2 pixel coordinates. ``mode`` "parts": one convex hull per part;
    "inner_face": one hull around all the parts (keeps the skin between them, still drops the
    face contour and background). ``dilation`` and ``feather`` are fractions of the face size
    (the mean side of the landmarks' bounding box).
    """
    cv2 = require("cv2", "The EmojiDiff local expression image")
    points_px = np.asarray(points_px, dtype=np.float64)[:, :2]
    parts = list(parts) if parts is not None else list(LOCAL_PARTS)
    for part in parts:
        if part not in LOCAL_PARTS:
            raise ValueError(f"unknown face part {part!r}; known: {', '.join(LOCAL_PARTS)}")
    if mode == "parts":
        groups = [LOCAL_PARTS[p] for p in parts]
    elif mode == "inner_face":
        groups = [tuple(sorted({i for p in parts for i in LOCAL_PARTS[p]}))]
    else:
        raise ValueError(f"mask mode must be 'parts' or 'inner_face'; got {mode!r}")
    mask = np.zeros((height, width), dtype=np.uint8)
    for group in groups:
        hull = cv2.convexHull(np.round(points_px[list(group)] * 16).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8, shift=4)
    face_size = _face_size(points_px)
    radius = int(round(dilation * face_size))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.dilate(mask, kernel)
    result = mask.astype(np.float32) / 255.0
    sigma = feather * face_size
    if sigma > 0:
        result = cv2.GaussianBlur(result, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return result


class LocalImage(NamedTuple):
    """EmojiDiff local images (B x size x size x 3), their masks (B x size x size), the
    full-resolution masks (B x H x W) and the source->crop matrices."""

    images: torch.Tensor
    masks: torch.Tensor
    full_masks: torch.Tensor
    matrix: torch.Tensor


def emojidiff_local_image(images, landmarks: Landmarks, size: int = 224, mode: str = "parts",
                          dilation: float = 0.04, feather: float = 0.0, margin: float = 1.2,
                          fill: float = 0.0) -> LocalImage:
    """EmojiDiff's expression "local image" for CLIP vision (see module docstring).

    The square is centred on the bounding box of the kept parts' landmarks, side ``margin``
    x its longer side; ``fill`` (0 black .. 1 white) replaces everything the mask removes.
    """
    images, rows = pair_images_landmarks(images, landmarks)
    batch, height, width, _ = images.shape
    points = rows[..., :2] * torch.tensor([float(width), float(height)])
    masks = torch.stack([
        torch.from_numpy(local_expression_mask(points[i].numpy(), height, width, mode=mode,
                                               dilation=dilation, feather=feather))
        for i in range(batch)
    ])
    kept_points = points[:, sorted({i for group in LOCAL_PARTS.values() for i in group})]
    low, high = kept_points.amin(dim=1), kept_points.amax(dim=1)
    centre = (low + high) / 2
    side = ((high - low).amax(dim=1) * float(margin)).clamp(min=1.0)
    box = SquareBox(centre[:, 0], centre[:, 1], side)
    # premultiplied: warp image*mask and the mask together, then fill what the mask removes
    # (outside the picture counts as removed)
    warped = warp_square(torch.cat([images * masks.unsqueeze(-1), masks.unsqueeze(-1)], dim=-1),
                         box, size, antialias=True)
    crop_mask = warped[..., 3]
    crop = warped[..., :3] + float(fill) * (1 - crop_mask.unsqueeze(-1))
    return LocalImage(crop.clamp(0, 1), crop_mask, masks, crop_matrix(box, size))

