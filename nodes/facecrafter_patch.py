"""ComfyUI host for FaceCrafter: ``attn2`` replaces adding the LMK/EMO branches with per-chunk switches.

Which chunks of a batch get a branch comes from ``transformer_options["facecrafter_switches"]``
({conditioning index: (alpha_LMK, alpha_EMO)}) when the FaceCrafter Guider runs the model, and from
:data:`adapters.facecrafter.CFG_SWITCHES` otherwise (a plain sampler: branches on for the
conditional rows, off for the unconditional ones). ComfyUI passes each chunk's conditioning index in
``cond_or_uncond``, in whatever order it batched them.
"""

from __future__ import annotations

import torch

from ..adapters.facecrafter import CFG_SWITCHES, MODULE_NAMES, row_alphas, switched_branch
from ..adapters.rows import RowLayout
from .cross_attention_patch import (
    BranchPatch,
    PerRunCache,
    SigmaGate,
    check_model_fits,
    install_branch_patches,
)

SWITCHES_KEY = "facecrafter_switches"
APPLICATIONS_KEY = "facecrafter"  # model_options entry listing the FaceCrafter applications on a model


class FaceCrafterTokens(PerRunCache):
    """One application: the modules' tokens (computed once, at apply time), strengths and a per-run K/V cache."""

    def __init__(self, crafter, tokens: dict[str, torch.Tensor | None], strengths: dict[str, float], gate: SigmaGate):
        super().__init__(gate)
        self.crafter = crafter
        self.tokens = {name: None if t is None else t.detach() for name, t in tokens.items()}
        self.strengths = strengths
        self.projections = 0  # how many K/V projections ran (tests check: once per layer and run)

    @property
    def active_modules(self) -> tuple[str, ...]:
        return tuple(name for name in MODULE_NAMES if self.tokens.get(name) is not None and self.strengths[name] != 0.0)

    def keys_values(self, name: str, layer, query: torch.Tensor, layout: RowLayout):
        """The module's keys/values for every row of ``layout``; one shared row stays one row (expanded where used)."""
        return self.cached((name, layer.comfy_key, query.device, query.dtype, layout.key),
                           lambda: self._keys_values(name, layer, query, layout))

    def _keys_values(self, name: str, layer, query: torch.Tensor, layout: RowLayout):
        what = "the landmark image" if name == "lmk" else "the emotion"
        tokens = self.tokens[name]
        if tokens.shape[0] != 1:  # one per image: the chunk's images (the context window's, if any), in every chunk
            tokens = layout.per_image(tokens, what)
        with torch.no_grad():
            key, value = getattr(self.crafter, name).branch(layer).keys_values(tokens.to(query.device, query.dtype))
        repeats = 1 if tokens.shape[0] == 1 else len(layout.chunks)
        self.projections += 1
        return key.repeat(repeats, 1, 1), value.repeat(repeats, 1, 1)


class FaceCrafterPatch(BranchPatch):
    """The previous attention (ID) plus the LMK/EMO branches, switched per chunk."""

    def branch(self, out, q, layout, extra_options):
        switches = extra_options.get(SWITCHES_KEY, CFG_SWITCHES)
        for module, name in enumerate(MODULE_NAMES):
            if name not in self.tokens.active_modules:
                continue
            alphas = row_alphas(layout, switches, module, self.tokens.strengths[name])
            if any(alphas):
                key, value = self.tokens.keys_values(name, self.layer, q, layout)
                out = switched_branch(out, q, key, value, extra_options["n_heads"], alphas)
        return out


def check_facecrafter_fits(crafter, model) -> None:
    """Refuse models that are not Arc2Face/SD1.5-shaped, naming FaceCrafter's base model."""
    for module in crafter.modules_present().values():
        try:
            check_model_fits(module, model)
        except ValueError as error:
            raise ValueError(f"FaceCrafter is built on Arc2Face (SD1.5) and cannot patch this model: {error}") from None


def apply_facecrafter(model, crafter, landmark_tokens=None, emotion_tokens=None, lmk_strength: float = 1.0,
                      emo_strength: float = 1.0, start_at: float = 0.0, end_at: float = 1.0):
    """A clone of ``model`` with FaceCrafter's branches on its layers, stacked on existing ``attn2`` replaces."""
    check_facecrafter_fits(crafter, model)
    patched = model.clone()
    gate = SigmaGate.from_percents(patched, 1.0, start_at, end_at)
    tokens = FaceCrafterTokens(crafter, {"lmk": landmark_tokens, "emo": emotion_tokens},
                               {"lmk": float(lmk_strength), "emo": float(emo_strength)}, gate)
    layers = {layer.comfy_key: layer for module in crafter.modules_present().values() for layer in module.layers}
    install_branch_patches(patched, FaceCrafterPatch, tokens, layers.values(), f"expression_adapters.facecrafter.{id(tokens)}")
    patched.model_options[APPLICATIONS_KEY] = (*patched.model_options.get(APPLICATIONS_KEY, ()), tokens)
    return patched


def facecrafter_applications(model) -> tuple[FaceCrafterTokens, ...]:
    return tuple(model.model_options.get(APPLICATIONS_KEY, ()))
