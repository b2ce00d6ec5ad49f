"""How our attention replaces share a layer with other packs' (IPAdapter_plus, InstantID, PuLID, core nodes).

ComfyUI keeps one replace per layer in ``transformer_options["patches_replace"][attn1|attn2]`` and looks it
up under the three-part key ``(block, id, index)`` first, then the block's two-part key ``(block, id)``.
Stacking needs four things, all here:

- **Ours after theirs:** the replace below ours is whatever ComfyUI would call for the layer now, under
  either key form (:func:`replace_below`); ours calls it and adds its branch to what it returns.
- **Theirs after ours, by ``.add``:** IPAdapter_plus, InstantID and PuLID do not wrap a replace they find
  at their key; they call ``existing.add(callback, **kwargs)`` on it (their ``Attn2Replace`` protocol) and
  mutate it in place. :class:`StackableReplace` answers that protocol: an added callback runs after our
  branch, on what the layer computed, gated by its own ``sigma_start``/``sigma_end`` as their class gates
  it. IPAdapter_plus uses two-part keys on SD1.5 and three-part keys on SDXL, so :func:`install_replaces`
  puts ours where a pack of either kind looks: under the block's key where the block holds one transformer
  (every SD1.5 block) and nothing sits at the layer's own key, else under the layer's key.
- **Theirs after ours, by overwriting:** a node that sets its replace at our layer's own key without
  calling ours (core's Self-Attention Guidance) would drop ours. At the start of each sampling run
  :func:`keep_ours_in_their_layers` puts a copy of ours back on top of such a replace, for that run only;
  a replace set later under the block's key (Perturbed-Attention Guidance's perturbed pass) takes the
  block, as ComfyUI gives a block to the last replace set there.
- **Clones stay apart:** ``ModelPatcher.clone()`` deep-copies ``model_options``; our replace copies itself
  (its added callbacks and the replace below it) but shares its tokens and per-run caches, so a pack that
  mutates the clone's replace never changes the model it was cloned from.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch

from .attention import attention_before, transformer_blocks

NO_SIGMA = 999999999.9  # what their Attn2Replace takes when a caller passes no sigmas: every callback runs
OURS_KEY = "expression_adapters.replaces"  # model_options: ((attention, replace), ...) in the order installed
STACKING_WRAPPER = "expression_adapters.stacking"


def replace_below(replaces: dict, key: tuple[str, int, int]):
    """The replace ComfyUI calls for layer ``key`` now (the layer's key first, then the block's), or None."""
    return replaces.get(key, replaces.get(key[:2]))


def registered_replaces(model, attention: str) -> dict:
    return model.model_options["transformer_options"].get("patches_replace", {}).get(attention, {})


def blocks_with_one_transformer(diffusion_model) -> set[tuple[str, int]]:
    """The ``(block, id)`` keys whose block holds exactly one transformer: there both key forms mean one layer."""
    depth = Counter(key[:2] for key in transformer_blocks(diffusion_model))
    return {block for block, count in depth.items() if count == 1}


def install_replaces(model, attention: str, keys, make_patch) -> None:
    """``make_patch(key, previous)`` as ``model``'s ``attention`` replace of each layer in ``keys``, ``previous``
    being the replace ComfyUI calls there now (either key form). Each goes under the block's key when the block
    holds one transformer and the layer's own key is free, else under the layer's key."""
    from comfy.patcher_extension import WrappersMP

    existing = registered_replaces(model, attention)
    single = blocks_with_one_transformer(model.get_model_object("diffusion_model"))
    setter = model.set_model_attn1_replace if attention == "attn1" else model.set_model_attn2_replace
    installed = []
    for key in keys:
        patch = make_patch(key, replace_below(existing, key))
        on_block = key[:2] in single and key not in registered_replaces(model, attention)
        setter(patch, *(key[:2] if on_block else key))
        installed.append((attention, patch))
    model.model_options[OURS_KEY] = (*model.model_options.get(OURS_KEY, ()), *installed)
    if not model.get_wrappers(WrappersMP.OUTER_SAMPLE, STACKING_WRAPPER):
        model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, STACKING_WRAPPER, keep_ours_in_their_layers)


def reaches(top, patch: StackableReplace) -> bool:
    """Whether ``patch`` runs when ComfyUI calls ``top``: it is ``top`` or lies below it in a chain of ours."""
    while isinstance(top, StackableReplace):
        if top is patch:
            return True
        top = top.previous
    return False


def lift_ours_over_later_replaces(model_options: dict) -> None:
    """Put a copy of each of our replaces that a later one at its layer's key overwrote back on top of it.

    ``model_options`` is one sampling run's own copy (``CFGGuider`` copies its nested dicts per run), so
    what is set here lasts for that run and never reaches the model.
    """
    patches = model_options.get("transformer_options", {}).get("patches_replace", {})
    for attention, patch in model_options.get(OURS_KEY, ()):
        replaces = patches.get(attention)
        top = None if replaces is None else replaces.get(patch.key)
        if top is not None and not reaches(top, patch):
            lifted = copy.copy(patch)
            lifted.previous = top
            replaces[patch.key] = lifted


def keep_ours_in_their_layers(executor, *args, **kwargs):
    """``OUTER_SAMPLE`` wrapper: :func:`lift_ours_over_later_replaces` on the guider's per-run options."""
    model_options = getattr(executor.class_obj, "model_options", None)
    if model_options is not None:
        lift_ours_over_later_replaces(model_options)
    return executor(*args, **kwargs)


class StackableReplace:
    """Base of our ``attn1``/``attn2`` replaces: the layer's key, the replace below, callbacks other packs add."""

    def __init__(self, key: tuple[str, int, int], previous=None):
        self.key = key
        self.previous = previous
        self.added: list[tuple[object, dict]] = []

    def attention_before(self, q, k, v, extra_options):
        return attention_before(self.previous, q, k, v, extra_options)

    def add(self, callback, **kwargs) -> None:
        """Other packs' ``Attn2Replace.add``: ``callback(out, q, k, v, extra_options, **kwargs)`` returns what to
        add to the layer's output while ``sigma_end <= sigma <= sigma_start``."""
        self.added.append((callback, kwargs))

    def run_added(self, out: torch.Tensor, q, k, v, extra_options: dict) -> torch.Tensor:
        if not self.added:
            return out
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.detach()[0]) if sigmas is not None else NO_SIGMA
        for callback, kwargs in self.added:
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)

    def to(self, *args, **kwargs):
        """ComfyUI's ``model_patches_to``: passed on to the replace below (their multi-GPU copies live there)."""
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(*args, **kwargs)
        return self

    def __deepcopy__(self, memo):
        duplicate = copy.copy(self)
        memo[id(self)] = duplicate
        duplicate.added = list(self.added)
        duplicate.previous = copy.deepcopy(self.previous, memo)
        return duplicate
