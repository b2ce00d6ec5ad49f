"""Reference attention: self-attention that also looks at a reference image's tokens.

The Reference UNet runs once on the reference image and records each transformer block's
self-attention input (the ``norm1`` output). In the denoising UNet, conditional rows attend over
their own tokens plus those recorded tokens, projected by the block's own ``to_k``/``to_v`` (which
carry the Reference Adapter's LoRA); unconditional rows keep plain self-attention.
"""

from __future__ import annotations

import torch

from .attention import multi_head_attention


def reference_rows(num_references: int, batch: int) -> torch.Tensor:
    """Which reference each of ``batch`` outputs reads: the only one, or one each."""
    if num_references == 1:
        return torch.zeros(batch, dtype=torch.long)
    if num_references == batch:
        return torch.arange(batch)
    raise ValueError(f"{num_references} reference images for a batch of {batch}: give one reference, or one per image")


def reference_attention(query, key, value, reference_key, reference_value, heads: int) -> torch.Tensor:
    """Attention of each row over its own keys/values followed by its reference's (same row count)."""
    return multi_head_attention(query, torch.cat([key, reference_key], dim=1), torch.cat([value, reference_value], dim=1), heads)
