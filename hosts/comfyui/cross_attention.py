"""ComfyUI host for cross-attention adapter branches: stackable, sigma-gated ``attn2`` replaces.

For each layer the adapter covers, an ``attn2`` replace computes the layer's usual attention (or
calls the replace registered before it) and adds the adapter branch from ``adapters.attention``; how it
stacks with IPAdapter_plus, InstantID, PuLID and our own branches, in either order, is ``stacking``'s job. What a
branch adds to which rows (keys/values and per-row scales for the shared row layout of ``adapters.rows``) is
its branch condition's (``adapters.branches``); this host decides the sigma gate once per UNet call and keeps
each layer's keys/values for one sampling run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ...adapters.branches import TokenCondition, add_branch, is_off
from ...adapters.layers import layout_for_cross_attention_keys
from ...adapters.rows import RowLayout
from .attention import transformer_blocks
from .stacking import StackableReplace, install_replaces


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
    """The branch's strength, active within [start_at, end_at] of sampling (percents converted to sigmas).

    Decided once per UNet call, not per layer: every layer of one call gets the same ``sigmas``
    tensor, so the comparison (a GPU->CPU sync on a GPU) runs for the first layer and the answer is
    kept until the next call's tensor arrives. The tensor and its answer are kept as one tuple, so
    chunks evaluated in threads (newer ComfyUI, several GPUs) never read another call's answer.
    :meth:`forget` drops it at the end of a sampling run.
    """

    def __init__(self, strength: float, sigma_start: float, sigma_end: float):
        self.strength = float(strength)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.decision: tuple[torch.Tensor, bool] | None = None  # the tensor held, so its id cannot be reused

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
        decision = self.decision
        if decision is None or decision[0] is not sigmas:
            decision = (sigmas, self.sigma_end <= float(sigmas.detach().max()) <= self.sigma_start)
            self.decision = decision
        return decision[1]

    def forget(self) -> None:
        self.decision = None


class PerRunCache:
    """Keys/values projected once per sampling run and reused at every step.

    :meth:`sampling_wrapper`, an ``OUTER_SAMPLE`` wrapper, empties the cache (and forgets the sigma
    gate's last decision) around each run, so nothing stays on the GPU after it. ``ModelPatcher.clone()``
    deep-copies model_options; what is held here is read-only while sampling, so clones share it.
    """

    def __init__(self, gate: SigmaGate | None = None):
        self.gate = gate
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._lock = threading.Lock()  # chunks evaluated in threads project each entry once
        self.projections = 0  # how many K/V projections ran (tests check: once per layer and run)

    def __deepcopy__(self, memo):
        return self

    def sampling_wrapper(self, executor, *args, **kwargs):
        self.clear()
        try:
            return executor(*args, **kwargs)
        finally:
            self.clear()

    def clear(self) -> None:
        self._cache.clear()
        if self.gate is not None:
            self.gate.forget()

    def cached(self, key: tuple, compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        found = self._cache.get(key)
        if found is None:
            with self._lock:
                found = self._cache.get(key)
                if found is None:
                    found = self._cache[key] = compute()
        return found

    def condition_keys_values(self, condition, layer, layer_key: tuple, layout: RowLayout, device, dtype):
        """``condition.keys_values`` (``adapters.branches``) for ``layer``, projected once per sampling run for
        each ``layer_key``, device, dtype and row layout."""
        def project():
            self.projections += 1
            with torch.no_grad():
                return condition.keys_values(layer, layout, device, dtype)

        return self.cached((*layer_key, device, dtype, layout.key), project)


class BranchCache(PerRunCache):
    """One application's branch conditions (``adapters.branches``) by name, sharing one sigma gate, with each
    condition's keys/values for a layer, device, dtype and row layout projected once per sampling run
    instead of at every step."""

    def __init__(self, conditions: dict[str, object], gate: SigmaGate):
        super().__init__(gate)
        self.conditions = conditions

    def keys_values(self, name: str, layer, layout: RowLayout, device, dtype):
        return self.condition_keys_values(self.conditions[name], layer, (name, layer.comfy_key), layout, device, dtype)


class BranchPatch(StackableReplace):
    """The ``attn2`` replace for one layer: the previous attention (the replace registered before, or the
    layer's own) plus each of ``cache``'s branches for the batch's row layout while its gate is active, then
    what other packs :meth:`~.stacking.StackableReplace.add`-ed to it."""

    def __init__(self, cache: BranchCache, layer, previous=None):
        super().__init__(layer.comfy_key, previous)
        self.cache = cache
        self.layer = layer

    def __call__(self, q, k, v, extra_options):
        out = self.attention_before(q, k, v, extra_options)
        if self.cache.gate.active(extra_options):
            layout = RowLayout.of(q.shape[0], extra_options)
            for name, condition in self.cache.conditions.items():
                scales = condition.scales(layout, extra_options)
                if not is_off(scales):
                    key, value = self.cache.keys_values(name, self.layer, layout, q.device, q.dtype)
                    out = add_branch(out, q, key, value, extra_options["n_heads"], scales)
        return self.run_added(out, q, k, v, extra_options)


def install_branch_patches(model, cache: BranchCache, layers, wrapper_key: str) -> None:
    """A :class:`BranchPatch` of ``cache`` as the ``attn2`` replace of each of ``layers`` on ``model`` (a clone),
    stacked on the replace ComfyUI would call there now (either key form), and the per-run cache's
    ``OUTER_SAMPLE`` wrapper."""
    from comfy.patcher_extension import WrappersMP

    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, wrapper_key, cache.sampling_wrapper)
    by_key = {layer.comfy_key: layer for layer in layers}
    install_replaces(model, "attn2", by_key, lambda key, previous: BranchPatch(cache, by_key[key], previous=previous))


def apply_token_condition(model, condition: TokenCondition, start_at: float = 0.0, end_at: float = 1.0,
                          name: str = "expression"):
    """A clone of ``model`` with ``condition``'s branch (its adapter's, at its strength) on each of the adapter's
    layers, stacked on existing replaces."""
    check_model_fits(condition.adapter, model)
    patched = model.clone()
    gate = SigmaGate.from_percents(patched, condition.strength, start_at, end_at)
    install_branch_patches(patched, BranchCache({name: condition}, gate), condition.adapter.layers,
                           "expression_adapters.branch_tokens")
    return patched


def apply_cross_attention_branch(model, adapter, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor,
                                 strength: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                                 what: str = "expression"):
    """A clone of ``model`` with ``adapter``'s branch on each of its layers, stacked on existing replaces."""
    condition = TokenCondition(adapter, cond_tokens.detach(), uncond_tokens.detach(), strength, f"the {what}")
    return apply_token_condition(model, condition, start_at, end_at, what)
