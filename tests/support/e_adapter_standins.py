"""Stand-in IP-Adapter files (random weights) in the published layouts, for the E-Adapter tests.

- FaceID (``ip-adapter-faceid_sd15.bin`` / ``_sdxl.bin``): ``torch.save`` of
  ``{"image_proj": {proj.0.*, proj.2.*, norm.*}, "ip_adapter": {N.to_k_ip.weight, N.to_v_ip.weight (odd N),
  N.to_{q,k,v,out}_lora.{down,up}.weight (every N)}}``.
- image (``ip-adapter_sd15.bin`` / ``ip-adapter_sdxl_vit-h.bin``): ``{"image_proj": {proj.*, norm.*},
  "ip_adapter": {N.to_k_ip.weight, N.to_v_ip.weight}}`` on every cross-attention layer.

The widths are those of the tiny UNets of ``tiny_unets`` (``width``) unless a width function is given. Unlike
the training package's stand-ins (``training.tiny.write_standin_published``, read off a diffusers UNet), these need
no UNet and draw every tensor, biases and norms too, at a scale that visibly moves the tiny models' outputs.
"""

from __future__ import annotations

import torch

from adapters.layers import LAYOUTS, attention_layers
from support.tiny_unets import CONTEXT_DIM, tiny_width
from training.tiny import LORA_PARTS, save_published


def _random(generator, *shape, std=0.3):
    return torch.randn(*shape, generator=generator) * std


def faceid_state(family: str = "SD1.5", seed: int = 0, token_dim: int = CONTEXT_DIM, lora_rank: int | None = 4,
                 width=tiny_width, id_dim: int = 512, std: float = 0.3) -> dict:
    layout = LAYOUTS[family]
    generator = torch.Generator().manual_seed(seed)
    hidden = 2 * id_dim
    image_proj = {"proj.0.weight": _random(generator, hidden, id_dim, std=std / 4), "proj.0.bias": _random(generator, hidden),
                  "proj.2.weight": _random(generator, 4 * token_dim, hidden, std=std / 8),
                  "proj.2.bias": _random(generator, 4 * token_dim),
                  "norm.weight": 1 + _random(generator, token_dim), "norm.bias": _random(generator, token_dim)}
    ip_adapter = {}
    for layer in attention_layers(layout):
        n, w = layer.checkpoint_number, width(layout, layer)
        if layer.is_cross:
            ip_adapter[f"{n}.to_k_ip.weight"] = _random(generator, w, token_dim, std=std)
            ip_adapter[f"{n}.to_v_ip.weight"] = _random(generator, w, token_dim, std=std)
        if lora_rank:
            context = token_dim if layer.is_cross else w
            for part in LORA_PARTS:
                fan_in = context if part in ("to_k", "to_v") else w
                ip_adapter[f"{n}.{part}_lora.down.weight"] = _random(generator, lora_rank, fan_in, std=0.1)
                ip_adapter[f"{n}.{part}_lora.up.weight"] = _random(generator, w, lora_rank, std=0.1)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def image_state(family: str = "SD1.5", seed: int = 1, token_dim: int = CONTEXT_DIM, clip_dim: int = 1024,
                width=tiny_width, std: float = 0.3) -> dict:
    layout = LAYOUTS[family]
    generator = torch.Generator().manual_seed(seed)
    image_proj = {"proj.weight": _random(generator, 4 * token_dim, clip_dim, std=std / 8), "proj.bias": _random(generator, 4 * token_dim),
                  "norm.weight": 1 + _random(generator, token_dim), "norm.bias": _random(generator, token_dim)}
    ip_adapter = {}
    for layer in attention_layers(layout):
        if layer.is_cross:
            w = width(layout, layer)
            ip_adapter[f"{layer.checkpoint_number}.to_k_ip.weight"] = _random(generator, w, token_dim, std=std)
            ip_adapter[f"{layer.checkpoint_number}.to_v_ip.weight"] = _random(generator, w, token_dim, std=std)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_published(folder, family: str = "SD1.5", clip_dim: int = 1024, lora_rank: int | None = 4):
    """The two published-layout .bin files of these states (written as the training package writes its own);
    returns their paths."""
    return save_published(folder, LAYOUTS[family], faceid_state(family, lora_rank=lora_rank),
                          image_state(family, clip_dim=clip_dim))
