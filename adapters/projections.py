"""Projections from a condition vector to a few cross-attention tokens.

- ``TokenProjection`` (IP-Adapter image form): Linear(in, tokens x dim), then LayerNorm(dim).
  Keys ``proj.weight/bias``, ``norm.weight/bias``.
- ``MLPProjection`` (IP-Adapter FaceID form): Linear(in, hidden), GELU, Linear(hidden, tokens x dim),
  then LayerNorm(dim). Keys ``proj.0.*``, ``proj.2.*``, ``norm.*``.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenProjection(nn.Module):
    def __init__(self, in_dim: int, token_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        self.proj = nn.Linear(in_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    @property
    def in_dim(self) -> int:
        return self.proj.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).reshape(-1, self.num_tokens, self.token_dim))


class MLPProjection(nn.Module):
    def __init__(self, in_dim: int, token_dim: int, num_tokens: int, hidden_dim: int | None = None):
        super().__init__()
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        hidden_dim = hidden_dim or 2 * in_dim
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tokens * token_dim))
        self.norm = nn.LayerNorm(token_dim)

    @property
    def in_dim(self) -> int:
        return self.proj[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).reshape(-1, self.num_tokens, self.token_dim))


def projection_from_state_dict(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build the projection whose keys and shapes ``state_dict`` has (weights not loaded)."""
    keys = set(state_dict)
    if "norm.weight" not in keys:
        raise KeyError("no 'norm.weight' (the projection's LayerNorm)")
    token_dim = state_dict["norm.weight"].shape[0]
    if {"proj.weight", "proj.bias"} <= keys:
        out_dim, in_dim = state_dict["proj.weight"].shape
        return TokenProjection(in_dim, token_dim, out_dim // token_dim)
    if {"proj.0.weight", "proj.2.weight"} <= keys:
        hidden_dim, in_dim = state_dict["proj.0.weight"].shape
        out_dim = state_dict["proj.2.weight"].shape[0]
        return MLPProjection(in_dim, token_dim, out_dim // token_dim, hidden_dim)
    raise KeyError("neither a Linear projection ('proj.weight') nor an MLP projection ('proj.0.weight', 'proj.2.weight')")
