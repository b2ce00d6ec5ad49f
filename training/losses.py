"""Training losses of EmojiDiff's ICA fine-tuning and FaceCrafter's joint stage (pure torch).

- Adaptive Noise Inversion (EmojiDiff Eq. 6): :func:`ani_factor`, :func:`ani_latent`.
- Wing loss (Feng et al. 2018) on landmarks: :func:`wing_loss`.
- Attention Disentanglement loss (FaceCrafter Eqs. 2-3): :func:`attention_disentanglement_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

R_TMAX = 600  # EmojiDiff supplementary B.1: ANI's cap

# Conditions of FaceCrafter's intra-batch mixed conditioning, as (alpha_LMK, alpha_EMO).
CONDITIONS = {"ID": (0, 0), "ID+LMK": (1, 0), "ID+EMO": (0, 1), "ID+LMK+EMO": (1, 1)}
# FaceCrafter Eq. 3: the five pairs of L_AD. (ID+EMO, ID+LMK+EMO) is not one of them.
AD_PAIRS = (("ID", "ID+LMK"), ("ID", "ID+EMO"), ("ID", "ID+LMK+EMO"), ("ID+LMK", "ID+EMO"), ("ID+LMK", "ID+LMK+EMO"))


def ani_factor(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, r_tmax: int = R_TMAX) -> torch.Tensor:
    """f(t) = sqrt((1 - abar_t) / abar_t) for t <= r_tmax, else f(r_tmax) (EmojiDiff Eq. 6)."""
    t = torch.clamp(timesteps.long(), max=int(r_tmax))
    abar = alphas_cumprod.to(timesteps.device, torch.float64)[t]
    return torch.sqrt((1.0 - abar) / abar).float()


def ani_latent(z0: torch.Tensor, noise: torch.Tensor, predicted_noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, r_tmax: int = R_TMAX) -> torch.Tensor:
    """The latent ANI decodes: z0 + f(t) (eps - eps_theta), with the ground-truth z0 (decode it with the VAE)."""
    factor = ani_factor(timesteps, alphas_cumprod, r_tmax).to(z0.dtype)
    return z0 + factor.view(-1, *([1] * (z0.dim() - 1))) * (noise - predicted_noise)


def wing_loss(predicted: torch.Tensor, target: torch.Tensor, width: float = 10 / 256, epsilon: float = 2 / 256) -> torch.Tensor:
    """Wing loss, mean over points and coordinates.

    wing(x) = w ln(1 + |x| / eps) for |x| < w, else |x| - C with C = w - w ln(1 + w / eps), which
    makes it continuous at w. Defaults: the Wing paper's w = 10, eps = 2 pixels, rescaled to
    coordinates normalised to a 256 crop (our choice: EmojiDiff names neither).
    """
    x = (predicted - target).abs()
    constant = width - width * torch.log1p(torch.tensor(width / epsilon, dtype=x.dtype))
    return torch.where(x < width, width * torch.log1p(x / epsilon), x - constant).mean()


def token_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """A B x H x W face mask resized (nearest) to a square token grid of ``tokens`` positions: B x tokens."""
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens do not form a square grid; give per-token masks instead")
    resized = F.interpolate(mask[:, None].float(), size=(side, side), mode="nearest")
    return resized.flatten(1)


def attention_disentanglement_loss(outputs: Sequence[torch.Tensor], conditions: Sequence[str], groups: torch.Tensor,
                                   masks: Sequence[torch.Tensor], pairs=AD_PAIRS, token_reduction: str = "mean",
                                   pair_reduction: str = "sum") -> torch.Tensor:
    """L_AD of FaceCrafter (Eqs. 2-3) over the rows of one mixed-conditioning batch.

    ``outputs``: per layer, the attention output of every row (R x L_n x C_n); ``conditions``: the
    condition name of each row (:data:`CONDITIONS`); ``groups``: which sampled example each row
    replicates (pairs are formed within an example); ``masks``: per layer, R x L_n binary face masks
    (:func:`token_mask`). For each pair (i, j) with row i in condition a and row j in condition b,
    (a, b) in ``pairs``: ReLU of the per-token cosine over channels, masked mean over tokens
    (``token_reduction="sum"``: masked sum); the pairs are summed (``pair_reduction="mean"``:
    averaged) and the layers averaged. The paper gives the formula but not these reductions:
    they are the spec's proposal (B3), configurable. No pair at all gives 0.
    """
    conditions = list(conditions)
    groups = torch.as_tensor(groups)
    index_pairs = [(i, j) for a, b in pairs for i, ci in enumerate(conditions) if ci == a
                   for j, cj in enumerate(conditions) if cj == b and int(groups[i]) == int(groups[j])]
    if not outputs:
        raise ValueError("no attention outputs were recorded")
    if not index_pairs:
        return outputs[0].sum() * 0.0
    first = torch.tensor([i for i, _ in index_pairs], device=outputs[0].device)
    second = torch.tensor([j for _, j in index_pairs], device=outputs[0].device)
    per_layer = []
    for output, mask in zip(outputs, masks, strict=True):
        cosine = F.cosine_similarity(output[first].float(), output[second].float(), dim=-1)  # P x L
        weight = mask.to(output.device, torch.float32)[first]
        masked = F.relu(cosine) * weight
        per_pair = masked.sum(-1)
        if token_reduction == "mean":
            per_pair = per_pair / weight.sum(-1).clamp_min(1.0)
        per_layer.append(per_pair.sum() if pair_reduction == "sum" else per_pair.mean())
    return torch.stack(per_layer).mean()
