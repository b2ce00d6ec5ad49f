"""Image conversions between ComfyUI IMAGE tensors, numpy arrays and OpenCV's BGR uint8.

Inputs are RGB (ComfyUI's and PIL's order). Accepted forms:

- a batch: a 4-D torch tensor or numpy array ``B x H x W x C`` (ComfyUI's IMAGE), or a
  list/tuple of single images;
- a single image: ``H x W`` or ``H x W x C``.

Channels: 1 (grey), 2 (grey + alpha), 3 (RGB), 4 (RGBA). Alpha is dropped, not composited:
face detectors look at the colour planes only, and ComfyUI's own loader splits alpha into a
separate MASK the same way.

Values by dtype: ``uint8`` as is; ``uint16`` (16-bit PNG/TIFF) scaled by 255/65535; other
integer types are 8-bit values when their maximum is at most 255, else 16-bit; ``bool`` is
0/255; floating point is ComfyUI's 0..1 range, clipped (HDR values above 1 saturate).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _as_numpy(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.bfloat16, torch.float16):
            image = image.float()
        return image.numpy()
    return np.asarray(image)


def _to_uint8_values(array: np.ndarray, label: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{label} has NaN or infinite pixel values")
        return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype == np.uint16 or (array.size and array.max() > 255):
            scaled = np.clip(array.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
            return np.rint(scaled).astype(np.uint8)
        return np.clip(array, 0, 255).astype(np.uint8)
    raise TypeError(f"{label} has unsupported dtype {array.dtype}")


def to_uint8_rgb(image, label: str = "image") -> np.ndarray:
    """One image (``H x W`` or ``H x W x C``, any supported dtype) as contiguous ``H x W x 3`` uint8 RGB."""
    array = _as_numpy(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{label} must be H x W or H x W x C; got shape {tuple(array.shape)}")
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise ValueError(f"{label} is empty (shape {tuple(array.shape)})")
    if channels in (1, 2):
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    elif channels != 3:
        raise ValueError(
            f"{label} has {channels} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)"
        )
    return np.ascontiguousarray(_to_uint8_values(array, label))


def split_batch(images) -> list:
    """The single images of a batch (4-D tensor/array or a list), or ``[images]`` for one image."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("the image batch is empty")
        return list(images)
    array = images if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim == 4:
        if array.shape[0] == 0:
            raise ValueError("the image batch is empty")
        return [array[index] for index in range(array.shape[0])]
    return [images]


def to_bgr_uint8_list(images) -> list[np.ndarray]:
    """A batch (see :func:`split_batch`) as ``H x W x 3`` uint8 BGR arrays, the order OpenCV and insightface use."""
    return [
        np.ascontiguousarray(to_uint8_rgb(image, f"image {index + 1}")[:, :, ::-1])
        for index, image in enumerate(split_batch(images))
    ]


def bgr_to_image_tensor(images_bgr: Sequence[np.ndarray]) -> torch.Tensor:
    """Same-size BGR uint8 images as a ComfyUI IMAGE: ``B x H x W x 3`` float32 RGB in 0..1."""
    if not images_bgr:
        raise ValueError("no images to stack")
    stacked = np.stack([np.asarray(image)[:, :, ::-1] for image in images_bgr]).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(stacked))
