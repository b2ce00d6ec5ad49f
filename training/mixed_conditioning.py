"""FaceCrafter's intra-batch mixed conditioning (§3.2): replicate each example, give each replica a condition.

Each sampled example is repeated ``replicas`` times (the paper: B, the batch size); each replica
draws (alpha_LMK, alpha_EMO) in {(0,0), (1,0), (0,1), (1,1)} with probability 1/4, independently.
The per-row alphas are the adapters' per-row scales. Whether replicas share the timestep and the
noise is not in the paper: shared by default (the conditions alone then make the rows differ),
``shared_noise=False`` draws them per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import CONDITIONS

COMBOS = tuple(CONDITIONS)  # ID, ID+LMK, ID+EMO, ID+LMK+EMO


@dataclass
class MixedRows:
    source: torch.Tensor  # R: the example each row replicates
    alphas: torch.Tensor  # R x 2: (alpha_LMK, alpha_EMO), 0. or 1.
    conditions: list[str]  # R condition names, for the AD loss pairs


def mixed_rows(examples: int, replicas: int, generator: torch.Generator) -> MixedRows:
    """Rows of a mixed-conditioning batch: ``examples`` x ``replicas`` rows, example-major."""
    if examples < 1 or replicas < 1:
        raise ValueError(f"need at least one example and one replica; got {examples} and {replicas}")
    source = torch.arange(examples).repeat_interleave(replicas)
    # drawn on the generator's device (the trainer's generator is on the GPU there), kept on the CPU
    draws = torch.randint(0, len(COMBOS), (examples * replicas,), generator=generator, device=generator.device).cpu()
    table = torch.tensor([CONDITIONS[name] for name in COMBOS], dtype=torch.float32)
    return MixedRows(source, table[draws], [COMBOS[int(k)] for k in draws])


def replicate(batch: dict, rows: MixedRows) -> dict:
    """Each tensor/list of ``batch`` indexed by the rows' source examples."""
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[name] = value[rows.source.to(value.device)]
        elif isinstance(value, list):
            out[name] = [value[int(i)] for i in rows.source]
        else:
            out[name] = value
    return out


def row_noise(shape: tuple[int, ...], rows: MixedRows, num_timesteps: int, generator: torch.Generator,
              shared_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise R x ..., timesteps R) on the generator's device: drawn per example and repeated, or per row with
    ``shared_noise=False``."""
    count = int(rows.source.max()) + 1 if shared_noise else len(rows.source)
    noise = torch.randn((count, *shape), generator=generator, device=generator.device)
    timesteps = torch.randint(0, num_timesteps, (count,), generator=generator, device=generator.device)
    if shared_noise:
        source = rows.source.to(generator.device)
        noise, timesteps = noise[source], timesteps[source]
    return noise, timesteps
