"""The seam between adapters and hosts: what one adapter branch adds at one attention layer of one batch.

Every cross-attention adapter is a *branch condition* (the Expression Adapter and the E-Adapter's ID and
expression branches: :class:`TokenCondition`; FaceCrafter's LMK and EMO modules:
``adapters.facecrafter.SwitchedCondition``). Asked for a layer, the batch's :class:`~.rows.RowLayout`, a
device and a dtype, it answers

- :meth:`keys_values`: the branch's keys and values, one row per batch row or one row for all. They are
  fixed for a sampling run, so hosts may cache them (ComfyUI's per-run caches do);
- :meth:`scales`: each row's scale, from the layout and the host's per-call options (a guider's switches).
  The strength is in it, and nowhere else; a row with scale 0 gets nothing and is not computed.

A host then calls :func:`add_branch`. ComfyUI's patches (``hosts/comfyui``) and the diffusers processor
(``hosts.diffusers``) both go through here, so the rows and the strength are spelled once.

A condition combines with the layer in one of two ways:

- *added* (every cross-attention branch above): :func:`add_branch` adds each row's scale times the attention of
  its query over the branch's keys/values to the layer's own output;
- *concatenated* (the Reference Adapter's read in self-attention, ``adapters.reference.ReferenceCondition``):
  its ``scales`` are a CPU bool per row, which rows read, and its keys/values one row per reading row (the
  recorded reference tokens through the layer's own ``to_k``/``to_v``); ``adapters.reference.attend_with_reference``
  appends them to the reading rows' own keys/values, so those rows attend over both in one softmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .attention import decoupled_attention
from .rows import RowLayout

Scales = float | Sequence[float] | torch.Tensor


class TokenCondition:
    """A branch whose conditional chunks attend to the condition's tokens (one row for the batch, or one per
    image: the context window's frames) and the other chunks to the adapter's unconditional tokens; every
    row at ``strength``. ``what`` names the condition in messages."""

    def __init__(self, adapter, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor, strength: float = 1.0,
                 what: str = "the expression"):
        self.adapter = adapter
        self.cond_tokens = cond_tokens
        self.uncond_tokens = uncond_tokens
        self.strength = float(strength)
        self.what = what

    def keys_values(self, layer, layout: RowLayout, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.adapter.branch(layer)
        cond = branch.keys_values(layout.per_image(self.cond_tokens, self.what).to(device, dtype))
        uncond = [t.expand(layout.chunk_size, -1, -1) for t in branch.keys_values(self.uncond_tokens.to(device, dtype))]
        return tuple(layout.stack(lambda index, part=part: (cond if layout.conditional(index) else uncond)[part])
                     for part in (0, 1))

    def scales(self, layout: RowLayout, options: Mapping | None = None) -> float:
        return self.strength


def is_off(scales: Scales) -> bool:
    """Whether no row gets the branch. A tensor never is: training keeps every branch in the graph."""
    if isinstance(scales, torch.Tensor):
        return False
    return not any(scales) if isinstance(scales, Sequence) else scales == 0.0


def add_branch(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
               scales: Scales) -> torch.Tensor:
    """``out`` plus, on each row, its scale times the attention of its query over ``key``/``value``.

    ``key``/``value``: one row per query row, or one for all. ``scales``: one number for every row, or one
    per row; rows with scale 0 are not computed and come back bit for bit. A tensor of scales (one, or one per
    row) computes every row: in training the branch's parameters must stay in the graph even where a row's
    scale is 0, or distributed data parallel waits forever for their gradients.
    """
    if isinstance(scales, torch.Tensor):
        return out + decoupled_attention(query, key, value, heads, scales).to(out.dtype)
    if not isinstance(scales, Sequence):
        return out if scales == 0.0 else out + decoupled_attention(query, key, value, heads, scales).to(out.dtype)
    on = [row for row, scale in enumerate(scales) if scale != 0.0]
    if not on:
        return out
    scale = torch.tensor([scales[row] for row in on], device=query.device, dtype=query.dtype)
    if len(on) == query.shape[0]:
        return out + decoupled_attention(query, key, value, heads, scale).to(out.dtype)
    rows = torch.tensor(on, device=query.device)
    if key.shape[0] > 1:
        key, value = key.index_select(0, rows), value.index_select(0, rows)
    branch = decoupled_attention(query.index_select(0, rows), key, value, heads, scale)
    return out.index_add(0, rows, branch.to(out.dtype))
