"""ComfyUI host for cross-attention adapter branches: stackable, sigma-gated ``attn2`` replaces.

For each layer the adapter covers, an ``attn2`` replace computes the layer's usual attention (or
calls the replace registered before it, so IPAdapter, InstantID and our own branches stack) and
adds the adapter branch from ``adapters.attention``. Rows follow ``cond_or_uncond``: conditional
rows attend to the condition's tokens, unconditional rows to the adapter's unconditional tokens.
"""

from __future__ import annotations

import torch

from ..adapters.attention import decoupled_attention
from ..adapters.layers import layout_for_cross_attention_keys
from .attention_host import COND, attention_before, transformer_blocks


def cross_attention_widths(diffusion_model: torch.nn.Module) -> dict[tuple[str, int, int], int]:
    """The ComfyUI patch key and query width of every cross-attention layer."""
    return {key: block.attn2.to_q.out_features for key, block in transformer_blocks(diffusion_model).items()
            if getattr(block, "attn2", None) is not None}


def check_model_fits(adapter, model) -> None:
    """Refuse a model whose UNet family or layer widths differ from the adapter's."""
    diffusion_model = model.get_model_object("diffusion_model")
    if not hasattr(diffusion_model, "input_blocks"):
        raise ValueError(f"{adapter.kind} needs an SD1.5 or SDXL UNet model; got {type(diffusion_model).__name__}")
    widths = cross_attention_widths(diffusion_model)
    layout = layout_for_cross_attention_keys(widths)
    if layout.name != adapter.layout.name:
        raise ValueError(
            f"this {adapter.kind} was made for {adapter.layout.name} models, but the model is {layout.name} "
            f"({len(widths)} cross-attention layers); load the adapter made for {layout.name} or use a {adapter.layout.name} model"
        )
    for layer in adapter.layers:
        branch_width, model_width = adapter.branch(layer).width, widths[layer.comfy_key]
        if branch_width != model_width:
            raise ValueError(
                f"{adapter.kind} layer {layer.diffusers_name} has width {branch_width} but the model's is {model_width}: "
                "the adapter belongs to a different base model"
            )


class SigmaGate:
    """The branch's strength, active within [start_at, end_at] of sampling (percents converted to sigmas)."""

    def __init__(self, strength: float, sigma_start: float, sigma_end: float):
        self.strength = float(strength)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)

    @classmethod
    def from_percents(cls, model, strength: float, start_at: float, end_at: float) -> SigmaGate:
        if not 0.0 <= start_at <= end_at <= 1.0:
            raise ValueError(f"need 0 <= start_at <= end_at <= 1; got start_at={start_at}, end_at={end_at}")
        sampling = model.get_model_object("model_sampling")
        return cls(strength, sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at))

    def active(self, extra_options: dict) -> bool:
        if self.strength == 0.0:
            return False
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        return self.sigma_end <= float(sigmas.detach().max()) <= self.sigma_start


class BranchTokens:
    """One application's tokens, shared by all its layers, with per-layer keys/values cached.

    Tokens and strength are fixed for the whole sampling run, so each layer's keys and values
    (the values already times the strength) are projected and laid out in rows once per device,
    dtype and batch layout, instead of at every step.
    """

    def __init__(self, adapter, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor, gate: SigmaGate,
                 condition: str = "expression"):
        self.adapter = adapter
        self.condition = condition  # what the rows are, for messages
        self.cond_tokens = cond_tokens.detach()
        self.uncond_tokens = uncond_tokens.detach()
        self.gate = gate
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the tokens and weights are read-only here.
        return self

    def rows(self, layer, query: torch.Tensor, cond_or_uncond: list[int]):
        """Keys and strength-scaled values for every row of ``query``, chunk by chunk as ``cond_or_uncond`` orders them."""
        chunk = query.shape[0] // len(cond_or_uncond)
        cache_key = (layer.comfy_key, query.device, query.dtype, tuple(cond_or_uncond), chunk)
        if cache_key not in self._cache:
            if len(self.cond_tokens) not in (1, chunk):
                raise ValueError(
                    f"the {self.condition} has {len(self.cond_tokens)} rows but the batch has {chunk} images: "
                    f"give one {self.condition} for the whole batch or one per image"
                )
            branch = self.adapter.branch(layer)
            with torch.no_grad():
                cond = branch.keys_values(self.cond_tokens.to(query.device, query.dtype))
                uncond = branch.keys_values(self.uncond_tokens.to(query.device, query.dtype))
            keys, values = [], []
            for kind in cond_or_uncond:
                k, v = cond if kind == COND else uncond
                keys.append(k.expand(chunk, -1, -1))
                values.append(v.expand(chunk, -1, -1) * self.gate.strength)
            self._cache[cache_key] = torch.cat(keys), torch.cat(values)
        return self._cache[cache_key]


class CrossAttentionBranchPatch:
    """The ``attn2`` replace for one layer: the previous attention plus this adapter's branch."""

    def __init__(self, tokens: BranchTokens, layer, previous=None):
        self.tokens = tokens
        self.layer = layer
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        out = attention_before(self.previous, q, k, v, extra_options)
        if not self.tokens.gate.active(extra_options):
            return out
        cond_or_uncond = extra_options.get("cond_or_uncond") or [COND]
        key, value = self.tokens.rows(self.layer, q, cond_or_uncond)
        return out + decoupled_attention(q, key, value, extra_options["n_heads"]).to(out.dtype)


def apply_cross_attention_branch(model, adapter, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor,
                                 strength: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                                 condition: str = "expression"):
    """A clone of ``model`` with ``adapter``'s branch on each of its layers, stacked on existing replaces."""
    check_model_fits(adapter, model)
    patched = model.clone()
    tokens = BranchTokens(adapter, cond_tokens, uncond_tokens, SigmaGate.from_percents(patched, strength, start_at, end_at),
                          condition)
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for layer in adapter.layers:
        patch = CrossAttentionBranchPatch(tokens, layer, previous=existing.get(layer.comfy_key))
        patched.set_model_attn2_replace(patch, *layer.comfy_key)
    return patched
