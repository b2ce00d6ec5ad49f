"""Shared ground for our attention patches in ComfyUI's SD1.5/SDXL UNets."""

from __future__ import annotations

import torch


def transformer_blocks(diffusion_model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Every transformer block by its ComfyUI patch key, read off the modules.

    The middle block is ``("middle", 0, index)``, as ComfyUI's UNet names it when it runs.
    """
    groups = (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks))
    blocks = {}
    for block_name, group in groups:
        for block_id, block in enumerate(group):
            for module in block.modules():
                for index, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                    blocks[(block_name, block_id, index)] = transformer
    return blocks


def attention_before(previous, q, k, v, extra_options):
    """What the layer computes without our patch: the replace registered before it, or ComfyUI's attention."""
    if previous is not None:
        return previous(q, k, v, extra_options)
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)
