"""Differentiable face models for EmojiDiff's ICA losses (spec A2, Stage IV): gradients flow to the image.

- :func:`load_torch_recognizer`: the user's ArcFace ONNX file (buffalo_l ``w600k_r50.onnx``)
  converted to torch by ``onnx2torch`` (a maintained converter), frozen; L_id compares its embeddings.
- :func:`arcface_similarity` + :func:`warp_faces`: the 5-keypoint ArcFace alignment as a similarity
  transform (least squares, Umeyama) applied with ``grid_sample``, so the crop stays differentiable
  in the image (the keypoints are the target's, constants).
- :func:`soft_argmax` + :func:`fan_landmarks`: 68 landmarks from FAN heatmaps (EmoNet's frozen FAN
  returns them) by soft-argmax, the 17 contour points (0-16) dropped, for L_exp's Wing loss.
- :func:`enable_decoder_checkpointing`: the VAE decoder recomputes activations in backward, which
  ANI's decode with gradients needs to fit in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# insightface's ArcFace template: the 5 keypoints' places in a 112 x 112 crop (eyes, nose, mouth corners).
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)
CONTOUR = range(17)  # the 68-point jaw line, excluded from L_exp (EmojiDiff supplementary B.1)


def load_torch_recognizer(onnx_path) -> torch.nn.Module:
    """The ONNX recogniser as a frozen torch module (inputs B x 3 x 112 x 112 in (x - 127.5) / 127.5)."""
    try:
        from onnx2torch import convert
    except ImportError as error:
        raise ImportError("the ICA identity loss needs the onnx2torch package: pip install onnx2torch") from error
    return convert(str(onnx_path)).eval().requires_grad_(False)


def arcface_similarity(kps: torch.Tensor, size: int = 112) -> torch.Tensor:
    """B x 2 x 3 similarity matrices mapping image pixels to the ArcFace crop (least squares over the 5 points)."""
    src = kps.to(torch.float64).reshape(-1, 5, 2)
    dst = (ARCFACE_TEMPLATE * (size / 112.0)).to(src.device)
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(0, keepdim=True)
    a, b = src - src_mean, dst - dst_mean
    # minimise sum |s R a + t - b|^2 with R = [[c, -d], [d, c]] scaled: closed form for 2-D similarity
    norm = (a ** 2).sum((1, 2))
    c = (a * b).sum((1, 2)) / norm
    d = (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).sum(1) / norm
    rotation = torch.stack([torch.stack([c, -d], -1), torch.stack([d, c], -1)], -2)
    translation = dst_mean.squeeze(1) - (rotation @ src_mean.transpose(1, 2)).squeeze(-1)
    return torch.cat([rotation, translation[..., None]], -1)


def warp_faces(images: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` (B x C x H x W) warped by pixel-space affine ``matrices`` (B x 2 x 3, source -> output)
    to ``size`` x ``size``, bilinear, zeros outside; cv2.warpAffine's pixel-centre convention."""
    batch, _, height, width = images.shape
    full = torch.cat([matrices.to(torch.float64), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64,
                                                              device=matrices.device).expand(batch, 1, 3)], 1)
    inverse = torch.linalg.inv(full)[:, :2]  # output pixel -> source pixel
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3).to(matrices.device)
    source = points @ inverse.transpose(1, 2)  # B x size^2 x 2
    grid = torch.stack([(2 * source[..., 0] + 1) / width - 1, (2 * source[..., 1] + 1) / height - 1], -1)
    grid = grid.reshape(batch, size, size, 2).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def arcface_embeddings(recognizer: torch.nn.Module, images: torch.Tensor, kps: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings of RGB ``images`` (B x 3 x H x W in -1..1, as decoded) aligned by ``kps`` (pixels)."""
    crops = warp_faces(images, arcface_similarity(kps), 112)
    # the decoded range -1..1 is (x - 127.5) / 127.5 of 0..255 already: ArcFace's input normalisation
    return F.normalize(recognizer(crops).flatten(1), dim=1)


def identity_loss(recognizer, teacher_images, current_images, kps) -> torch.Tensor:
    """L_id = 1 - cos(ArcFace(teacher), ArcFace(current)), mean over the batch (EmojiDiff Eq. 7)."""
    with torch.no_grad():
        teacher = arcface_embeddings(recognizer, teacher_images, kps)
    current = arcface_embeddings(recognizer, current_images, kps)
    return (1 - (teacher * current).sum(1)).mean()


def soft_argmax(heatmaps: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Expected (x, y) in heatmap pixels under softmax(beta * heatmap) per point: B x N x H x W -> B x N x 2."""
    batch, points, height, width = heatmaps.shape
    weights = torch.softmax(beta * heatmaps.flatten(2).float(), dim=-1).reshape(batch, points, height, width)
    xs = torch.arange(width, dtype=weights.dtype, device=weights.device)
    ys = torch.arange(height, dtype=weights.dtype, device=weights.device)
    return torch.stack([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], -1)


def fan_landmarks(fan: torch.nn.Module, crops: torch.Tensor, beta: float = 100.0, drop_contour: bool = True) -> torch.Tensor:
    """Landmarks of 256 x 256 face crops (B x 3 x 256 x 256 in 0..1) from the FAN's 68 heatmaps, by soft-argmax,
    normalised to the crop (0..1); 51 points without the contour. ``fan`` returns ``{"heatmap": B x 68 x h x w}``
    (EmoNet does). ``beta`` sharpens the heatmaps (FAN peaks are about 1): our choice, configurable."""
    heatmaps = fan(crops)["heatmap"]
    points = soft_argmax(heatmaps, beta)
    size = torch.tensor([heatmaps.shape[-1], heatmaps.shape[-2]], dtype=points.dtype, device=points.device)
    points = (points + 0.5) / size
    if drop_contour:
        points = points[:, CONTOUR.stop:]
    return points


def enable_decoder_checkpointing(vae) -> None:
    """diffusers' gradient checkpointing on the VAE (the decoder's blocks recompute in backward)."""
    vae.enable_gradient_checkpointing()
