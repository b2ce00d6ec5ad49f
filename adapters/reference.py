"""Reference attention: self-attention that also looks at a reference image's tokens.

The Reference UNet runs once on the reference image and records each transformer block's
self-attention input (the ``norm1`` output). In the denoising UNet, conditional rows attend over
their own tokens plus those recorded tokens, projected by the block's own ``to_k``/``to_v`` (which
carry the Reference Adapter's LoRA); unconditional rows keep plain self-attention.

The read is a branch condition on the seam of ``adapters.branches``: :class:`ReferenceCondition` answers
the reading rows' keys/values for a layer (a :class:`ReferenceLayer`) and a row layout, and which rows read;
:func:`attend_with_reference` combines them with the layer's own.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import NamedTuple

import torch

from .rows import RowLayout


class ReferenceLayer(NamedTuple):
    """One self-attention layer as the Reference read sees it: ``key`` names its recorded tokens (ComfyUI's
    patch key, diffusers' module name), ``attention`` is the host's module whose ``to_k``/``to_v`` (LoRA-patched)
    project them."""

    key: Hashable
    attention: torch.nn.Module


class ReferenceCondition:
    """The recorded tokens ({layer key: (references, tokens, width)}) as the condition self-attention reads.

    One reference serves every image, or there is one per image (of a context window's frames too). The
    conditional chunks of a :class:`~.rows.RowLayout` read it, each chunk the same rows (the FaceCrafter
    Guider has three such chunks); or, given ``reads`` (a bool per batch row: training's per-sample dropout),
    those rows, in row order reading reference 0, 1, ... or all the one reference.
    """

    def __init__(self, tokens: Mapping[Hashable, torch.Tensor], reads: torch.Tensor | None = None,
                 what: str = "the reference image batch"):
        self.tokens = tokens
        self.reads = None if reads is None else reads.bool().cpu()
        self.what = what

    def keys_values(self, layer: ReferenceLayer, layout: RowLayout, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded tokens of ``layer`` through its ``to_k``/``to_v``: one row per reading row, in row order."""
        if self.reads is None:
            chunk, chunks = layout, layout.conditional_chunks
        else:
            chunk, chunks = RowLayout(int(self.reads.sum())), 1
        tokens = chunk.per_image(self.tokens[layer.key], self.what).to(device, dtype)
        key, value = layer.attention.to_k(tokens), layer.attention.to_v(tokens)
        if chunks > 1:
            key, value = key.repeat(chunks, 1, 1), value.repeat(chunks, 1, 1)
        return key, value

    def scales(self, layout: RowLayout, options: Mapping | None = None) -> torch.Tensor:
        """A CPU bool per row: whether it reads the reference (:func:`attend_with_reference`'s ``reads``)."""
        return layout.conditional_mask() if self.reads is None else self.reads

    @property
    def references(self) -> int:
        return next(iter(self.tokens.values())).shape[0]


def attend_with_reference(query, key, value, reads: torch.Tensor, reference_key, reference_value, attention):
    """Self-attention where the rows flagged in ``reads`` also attend to reference tokens.

    ``reads``: a CPU bool per row (a :class:`ReferenceCondition`'s ``scales``). ``reference_key``/
    ``reference_value``: one row per reading row (in row order) or one row for all; not read when no row
    reads (None will do). ``attention(q, k, v, reading)`` is the host's attention for a group of rows,
    ``reading`` telling which group: reading rows get their own keys/values followed by the reference's (so
    an attention chain registered before the host's patch still runs for them), the other rows exactly
    their own.
    """
    reading_rows = int(reads.sum())
    if reading_rows == 0:
        return attention(query, key, value, False)
    if reference_key.shape[0] == 1:
        reference_key = reference_key.expand(reading_rows, -1, -1)
        reference_value = reference_value.expand(reading_rows, -1, -1)
    if reading_rows == reads.numel():
        return attention(query, torch.cat([key, reference_key], 1), torch.cat([value, reference_value], 1), True)
    read_index = reads.nonzero().flatten().to(query.device)
    plain_index = (~reads).nonzero().flatten().to(query.device)
    read = attention(query[read_index], torch.cat([key[read_index], reference_key], 1),
                     torch.cat([value[read_index], reference_value], 1), True)
    plain = attention(query[plain_index], key[plain_index], value[plain_index], False)
    out = torch.empty((query.shape[0], *read.shape[1:]), device=read.device, dtype=read.dtype)
    out[read_index] = read
    out[plain_index] = plain.to(read.dtype)
    return out
