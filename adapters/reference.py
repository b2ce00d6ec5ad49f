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


def attend_with_reference(query, key, value, reads: torch.Tensor, reference_key, reference_value, attention):
    """Self-attention where the rows flagged in ``reads`` also attend to reference tokens.

    ``reads``: a CPU bool per row. ``reference_key``/``reference_value``: one row per reading row
    (in row order) or one row for all. ``attention(q, k, v, reading)`` is the host's attention for a
    group of rows, ``reading`` telling which group: reading rows get their own keys/values followed
    by the reference's (so an attention chain registered before the host's patch still runs for
    them), the other rows exactly their own.
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
