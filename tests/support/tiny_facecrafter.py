"""A FaceCrafter stand-in with random weights sized for the tiny SD1.5 UNet of ``tiny_unets``."""

from __future__ import annotations

import torch

from adapters.facecrafter import EmotionEncoderConfig, FaceCrafter, LandmarkEncoderConfig
from adapters.layers import SD15, cross_attention_layers
from support.tiny_unets import CONTEXT_DIM, tiny_width

# 64 x 64 landmark images -> 2 x 2 = 4 LMK tokens of CONTEXT_DIM
TINY_LMK = LandmarkEncoderConfig(image_size=64, channels=(8, 8, 8, 16, 16, 16), token_dim=CONTEXT_DIM, res_blocks=1, groups=8)
TINY_EMO = EmotionEncoderConfig(hidden_dim=16, token_dim=CONTEXT_DIM, num_tokens=4)


def random_facecrafter(lmk: bool = True, emo: bool = True, seed: int = 0) -> FaceCrafter:
    """Every weight random (also V, which starts at zero when built), so each branch changes the output."""
    torch.manual_seed(seed)
    widths = {layer.checkpoint_number: tiny_width(SD15, layer) for layer in cross_attention_layers(SD15)}
    crafter = FaceCrafter(TINY_LMK if lmk else None, TINY_EMO if emo else None, widths=widths)
    with torch.no_grad():
        for name, parameter in crafter.named_parameters():
            if ".kv." in name or name.endswith("position"):
                parameter.normal_(0.0, 0.3)
    return crafter.eval()


def landmark_images(batch: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    """ComfyUI IMAGE batch (B, H, W, 3): a few coloured strokes on black, like a landmark drawing."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, size, size, 3)
    for i in range(batch):
        rows = torch.randint(0, size, (6,), generator=generator)
        images[i, rows, size // 4: 3 * size // 4] = torch.rand(6, 1, 3, generator=generator)
    return images
