"""SMIRK's expression encoder (FLAME expression, eyelids, jaw from a face crop), written on timm.

Architecture (SMIRK, Retsinas et al. 2024, ``ExpressionEncoder``), as this module assumes it:

- ``encoder``: ``timm.create_model('tf_mobilenetv3_large_minimal_100', features_only=True)``;
  only its last feature map (960 channels, stride 32) is used;
- global average pooling of that map to 960 numbers;
- ``expression_layers``: ``nn.Sequential(nn.Linear(960, 55))`` (so its keys are
  ``expression_layers.0.weight`` and ``expression_layers.0.bias``);
- output split: expression = [0:50]; eyelids = clamp([50:52], 0, 1); jaw = [relu([52]),
  clamp([53:55], -0.2, 0.2)].

The published checkpoint ``SMIRK_em1.pt`` is a flat state dict of the whole SMIRK trainer;
the expression encoder's entries are ``smirk_encoder.expression_encoder.<encoder...|expression_layers.0...>``.
Only those are read (pose/shape encoders, the generator and anything else in the file are
ignored) and they must match this module exactly (strict load), except that BatchNorm
``num_batches_tracked`` counters may be absent. The timm feature model's parameter names
(``conv_stem``, ``bn1``, ``blocks.i.j.*``) are those of timm's ``MobileNetV3Features``, which
have been stable since timm 0.4.

Input: the SMIRK crop (see :mod:`encoders.face_crops`): 224 x 224, values 0..1, no mean/std.
SMIRK itself was trained on RGB; the Arc2Face Expression Adapter demo fed OpenCV's BGR frames,
so ``channel_order`` is an option (default RGB).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .expressions import FlameExpression, Landmarks
from .face_crops import smirk_crop, to_image_batch
from .optional import require
from .weight_files import assign_weights, fill_batchnorm_counters, read_checkpoint, without_init

SMIRK_PREFIX = "smirk_encoder.expression_encoder."
SMIRK_BACKBONE = "tf_mobilenetv3_large_minimal_100"
SMIRK_FEATURES = 960
SMIRK_OUTPUTS = 55
SMIRK_INPUT_SIZE = 224
SMIRK_CROP_SCALE = 1.4
SMIRK_CHECKPOINT_NAME = "SMIRK_em1.pt"


def smirk_output_clamps(parameters: torch.Tensor) -> torch.Tensor:
    """Apply SMIRK's output nonlinearities to raw B x 55 parameters."""
    return torch.cat([
        parameters[:, :50],
        parameters[:, 50:52].clamp(0.0, 1.0),
        F.relu(parameters[:, 52:53]),
        parameters[:, 53:55].clamp(-0.2, 0.2),
    ], dim=1)


class SmirkExpressionEncoder(nn.Module):
    """SMIRK's expression encoder; ``forward`` takes B x 3 x 224 x 224 crops (0..1) and gives B x 55."""

    def __init__(self, backbone: str = SMIRK_BACKBONE, n_outputs: int = SMIRK_OUTPUTS):
        super().__init__()
        timm = require("timm", "The SMIRK expression encoder")
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True)
        features = self.encoder.feature_info.channels()[-1]
        self.expression_layers = nn.Sequential(nn.Linear(features, n_outputs))

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)[-1]
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.expression_layers(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return smirk_output_clamps(self.raw(images))


def _unwrap_checkpoint(checkpoint) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        if any(isinstance(k, str) and k.startswith(SMIRK_PREFIX) for k in checkpoint):
            return checkpoint
        for key in ("state_dict", "model", "model_state_dict"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping):
                return _unwrap_checkpoint(inner)
    raise ValueError("no SMIRK expression encoder in it")


def expression_encoder_state_dict(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``smirk_encoder.expression_encoder.*`` entries of a SMIRK checkpoint, prefix removed.

    Accepts the flat published dict, the same under "state_dict"/"model", or an already
    stripped dict (keys starting with ``encoder.`` / ``expression_layers.``).
    """
    if isinstance(checkpoint, Mapping) and any(
        isinstance(k, str) and k.startswith("expression_layers.") for k in checkpoint
    ):
        return dict(checkpoint)
    checkpoint = _unwrap_checkpoint(checkpoint)
    return {k[len(SMIRK_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(SMIRK_PREFIX)}


def load_smirk_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> SmirkExpressionEncoder:
    """Build the encoder and load ``SMIRK_em1.pt`` (or a safetensors file with the same keys) strictly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SMIRK checkpoint not found: {path}. Put {SMIRK_CHECKPOINT_NAME} (from the SMIRK project, "
            "https://github.com/georgeretsi/smirk) in ComfyUI/models/smirk"
        )
    checkpoint = read_checkpoint(path)
    try:
        state = expression_encoder_state_dict(checkpoint)
    except ValueError as error:
        raise ValueError(
            f"{path} is not a SMIRK checkpoint: {error} (expected keys starting with '{SMIRK_PREFIX}')"
        ) from None
    with without_init():  # every weight comes from the file
        model = SmirkExpressionEncoder()
    expected = model.state_dict()
    fill_batchnorm_counters(expected, state)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the SMIRK expression encoder ({SMIRK_BACKBONE}, Linear 960->55 under "
            f"'{SMIRK_PREFIX}'): missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"wrong shapes {wrong[:8]}"
        )
    assign_weights(model, state)
    return model.eval().to(device)


def smirk_input(crops: torch.Tensor, channel_order: str = "RGB") -> torch.Tensor:
    """B x H x W x 3 RGB crops (0..1) -> B x 3 x H x W network input in ``channel_order``."""
    channel_order = channel_order.upper()
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR'; got {channel_order!r}")
    tensor = crops.permute(0, 3, 1, 2)
    if channel_order == "BGR":
        tensor = tensor.flip(1)
    return tensor.contiguous()


@torch.no_grad()
def encode_expression(model: SmirkExpressionEncoder, images, landmarks: Landmarks,
                      channel_order: str = "RGB", scale: float = SMIRK_CROP_SCALE,
                      batch_size: int = 16) -> tuple[FlameExpression, torch.Tensor]:
    """FLAME expression of each image (B x H x W x 3, 0..1) given its 478 MediaPipe landmarks.

    Returns the expression (one row per image) and the SMIRK crops (B x 224 x 224 x 3, RGB) for preview.
    """
    model.eval()
    images = to_image_batch(images)
    crop = smirk_crop(images, landmarks, scale=scale, size=SMIRK_INPUT_SIZE)
    parameter = next(model.parameters())
    rows = []
    for start in range(0, crop.images.shape[0], batch_size):
        chunk = smirk_input(crop.images[start : start + batch_size], channel_order)
        rows.append(model(chunk.to(parameter.device, parameter.dtype)).float().cpu())
    return FlameExpression(torch.cat(rows)), crop.images
