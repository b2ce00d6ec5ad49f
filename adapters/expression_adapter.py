"""The Arc2Face Expression Adapter: 55 FLAME blendshape parameters -> 4 tokens per cross-attention layer.

Loads the published ``exp_adapter.bin`` (projection as Linear+LayerNorm or as an MLP; 16
bias-free ``to_k_ip``/``to_v_ip`` pairs numbered 1..31) and saves the same layout as safetensors.
"""

from __future__ import annotations

import torch

from .checkpoints import AdapterFileError
from .cross_attention_adapter import CrossAttentionAdapter

FLAME_DIM = 55


class ExpressionAdapter(CrossAttentionAdapter):
    kind = "Arc2Face Expression Adapter"
    base_model = "Arc2Face (SD1.5)"
    default_scale = 1.0

    def _check(self, path) -> None:
        if self.image_proj.in_dim != FLAME_DIM:
            raise AdapterFileError(path, self.kind, self.base_model,
                                   f"its projection takes {self.image_proj.in_dim} inputs, not {FLAME_DIM} FLAME parameters")

    def expression_tokens(self, expression: torch.Tensor) -> torch.Tensor:
        """(batch, 55) FLAME parameters -> (batch, tokens, token_dim)."""
        if expression.dim() != 2 or expression.shape[1] != FLAME_DIM:
            raise ValueError(f"FLAME expression must have shape (batch, {FLAME_DIM}); got {tuple(expression.shape)}")
        if not torch.isfinite(expression).all():
            raise ValueError("FLAME expression has NaN or infinite values")
        return self.project(expression)

    def unconditional_tokens(self) -> torch.Tensor:
        """The tokens of the zero expression: what the model saw for "no expression" in training.

        Projected, so they are not zero: the LayerNorm bias alone makes them non-zero.
        """
        return self.expression_tokens(torch.zeros(1, FLAME_DIM))
