"""The catalogue of attention layers of SD1.5- and SDXL-shaped UNets.

One entry per attention layer, naming it three ways:
- its diffusers module name (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``),
- its ComfyUI patch key ``(block, id, index)`` (``("input", 1, 0)``; the middle block is
  ``("middle", 0, index)``), as used by ``patches_replace["attn2"]``,
- its IP-Adapter checkpoint number: processors are numbered in diffusers registration order
  (down blocks, then up blocks, then the mid block; attn1 before attn2 in each transformer block),
  so cross-attention layers carry the odd numbers ``2n+1`` (``"1.to_k_ip.weight"`` ...).

Layer selections (for example EmojiDiff's SDXL expression layers) are named sets over this
catalogue, so node and training code never lists layers by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class AttentionLayer:
    diffusers_name: str
    comfy_key: tuple[str, int, int]
    checkpoint_number: int
    is_cross: bool

    @property
    def transformer_name(self) -> str:
        """The diffusers name of the attention module (``...attentions.1``) holding this layer."""
        return self.diffusers_name.split(".transformer_blocks.")[0]


@dataclass(frozen=True)
class UNetLayout:
    """The attention structure of a UNet family, enough to enumerate its layers."""

    name: str
    down_depths: tuple[int, ...]  # transformer blocks per attention module, per resolution level
    mid_depth: int
    layers_per_block: int
    context_dim: int  # the width of the text tokens its cross-attention reads

    @property
    def up_depths(self) -> tuple[int, ...]:
        return tuple(reversed(self.down_depths))


SD15 = UNetLayout("SD1.5", down_depths=(1, 1, 1, 0), mid_depth=1, layers_per_block=2, context_dim=768)
SDXL = UNetLayout("SDXL", down_depths=(0, 2, 10), mid_depth=10, layers_per_block=2, context_dim=2048)
LAYOUTS = {layout.name: layout for layout in (SD15, SDXL)}


def _transformer_blocks(layout: UNetLayout):
    """(diffusers prefix, ComfyUI block, ComfyUI id, index) per transformer block, in diffusers order."""
    per_level = layout.layers_per_block + 1  # ComfyUI: each level's resnets plus one downsample
    for level, depth in enumerate(layout.down_depths):
        for j in range(layout.layers_per_block if depth else 0):
            for t in range(depth):
                yield f"down_blocks.{level}.attentions.{j}.transformer_blocks.{t}", "input", 1 + level * per_level + j, t
    for level, depth in enumerate(layout.up_depths):
        for j in range(per_level if depth else 0):
            for t in range(depth):
                yield f"up_blocks.{level}.attentions.{j}.transformer_blocks.{t}", "output", level * per_level + j, t
    for t in range(layout.mid_depth):
        yield f"mid_block.attentions.0.transformer_blocks.{t}", "middle", 0, t


@cache
def attention_layers(layout: UNetLayout) -> tuple[AttentionLayer, ...]:
    layers = []
    for n, (prefix, block, block_id, index) in enumerate(_transformer_blocks(layout)):
        key = (block, block_id, index)
        layers.append(AttentionLayer(f"{prefix}.attn1", key, 2 * n, is_cross=False))
        layers.append(AttentionLayer(f"{prefix}.attn2", key, 2 * n + 1, is_cross=True))
    return tuple(layers)


def cross_attention_layers(layout: UNetLayout) -> tuple[AttentionLayer, ...]:
    return tuple(layer for layer in attention_layers(layout) if layer.is_cross)


def self_attention_layers(layout: UNetLayout) -> tuple[AttentionLayer, ...]:
    return tuple(layer for layer in attention_layers(layout) if not layer.is_cross)


# Named selections of cross-attention layers, as predicates over the catalogue.
LAYER_SETS = {
    "all": lambda layer: True,
    # EmojiDiff injects expression only in "Up 0.1" on SDXL (up_blocks.0.attentions.1, 10 blocks);
    # on SD1.5 it saw no style leakage and uses every layer.
    "emojidiff_expression_sdxl": lambda layer: layer.transformer_name == "up_blocks.0.attentions.1",
    "down": lambda layer: layer.diffusers_name.startswith("down_blocks."),
    "mid": lambda layer: layer.diffusers_name.startswith("mid_block."),
    "up": lambda layer: layer.diffusers_name.startswith("up_blocks."),
}


def select_layers(layout: UNetLayout, layer_set: str = "all") -> tuple[AttentionLayer, ...]:
    """The cross-attention layers of ``layout`` in the named set."""
    try:
        keep = LAYER_SETS[layer_set]
    except KeyError:
        raise ValueError(f"unknown layer set {layer_set!r}; known: {', '.join(LAYER_SETS)}") from None
    return tuple(layer for layer in cross_attention_layers(layout) if keep(layer))


def layout_for_cross_attention_keys(keys) -> UNetLayout:
    """Recognise a UNet family from the ComfyUI keys of its cross-attention layers."""
    keys = set(keys)
    for layout in LAYOUTS.values():
        if keys == {layer.comfy_key for layer in cross_attention_layers(layout)}:
            return layout
    raise ValueError(
        f"this model has {len(keys)} cross-attention layers in a structure that is neither SD1.5 "
        f"(16 layers) nor SDXL (70 layers); expression adapters support those two UNet families"
    )
