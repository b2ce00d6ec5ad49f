"""Decoupled cross-attention (IP-Adapter style): an extra attention branch over adapter tokens.

A host hands over the layer's projected query (batch, queries, width); the branch projects the
adapter tokens with the layer's own ``to_k_ip``/``to_v_ip`` and adds ``scale`` times their
attention output to the layer's usual output. Every row carries its own tokens, so conditional
and unconditional rows of one classifier-free-guidance batch can differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention of (batch, tokens, width) tensors split into ``heads``."""
    batch, _, width = query.shape
    head_dim = width // heads
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, width)


class KeyValueBranch(nn.Module):
    """The extra key/value projections one cross-attention layer gets (bias-free, as published)."""

    def __init__(self, token_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(token_dim, width, bias=False)
        self.to_v_ip = nn.Linear(token_dim, width, bias=False)

    @property
    def width(self) -> int:
        return self.to_k_ip.out_features

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight_k = self.to_k_ip.weight.to(device=tokens.device, dtype=tokens.dtype)
        weight_v = self.to_v_ip.weight.to(device=tokens.device, dtype=tokens.dtype)
        return F.linear(tokens, weight_k), F.linear(tokens, weight_v)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, heads: int, scale=1.0) -> torch.Tensor:
        """``scale`` x attention of ``query`` over ``tokens``; see :func:`decoupled_attention`."""
        key, value = self.keys_values(tokens.to(query.dtype))
        return decoupled_attention(query, key, value, heads, scale)


def decoupled_attention(query, key, value, heads: int, scale=1.0) -> torch.Tensor:
    """The branch output for already projected keys/values.

    ``key``/``value`` have one row per query row, or one row shared by all. ``scale`` is a
    number or a per-row tensor of shape (batch,).
    """
    if key.shape[0] == 1 and query.shape[0] > 1:
        key = key.expand(query.shape[0], -1, -1)
        value = value.expand(query.shape[0], -1, -1)
    if key.shape[0] != query.shape[0]:
        raise ValueError(f"adapter tokens have {key.shape[0]} rows but the attention batch has {query.shape[0]}")
    out = multi_head_attention(query, key, value, heads)
    if isinstance(scale, torch.Tensor):
        return out * scale.to(out).reshape(-1, 1, 1)
    return out if scale == 1.0 else out * scale
