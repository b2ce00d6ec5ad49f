"""ComfyUI host for FaceCrafter: ``attn2`` replaces adding the LMK/EMO branches with per-chunk switches.

Each module given is a branch condition (``adapters.facecrafter.SwitchedCondition``): which chunks of a batch
get it comes from ``transformer_options["facecrafter_switches"]`` ({conditioning index: (alpha_LMK,
alpha_EMO)}) when the FaceCrafter Guider runs the model, and from :data:`adapters.facecrafter.CFG_SWITCHES`
otherwise (a plain sampler: branches on for the conditional rows, off for the unconditional ones). ComfyUI
passes each chunk's conditioning index in ``cond_or_uncond``, in whatever order it batched them.
"""

from __future__ import annotations

from ...adapters.facecrafter import GUIDANCE_SWITCHES, MODULE_NAMES, SwitchedCondition
from ...adapters.rows import COND, UNCOND
from .cross_attention import BranchCache, SigmaGate, check_model_fits, install_branch_patches

# What the guider's post-CFG hooks see when they run the model again (PAG, SAG): ComfyUI's indices
# (0 positive, 1 negative) with the positive being the ID prediction, FaceCrafter's branches off,
# so a hook's re-run of its ``cond`` matches the ``cond_denoised`` it was given.
HOOK_SWITCHES = {COND: GUIDANCE_SWITCHES[1], UNCOND: GUIDANCE_SWITCHES[0]}
APPLICATIONS_KEY = "facecrafter"  # model_options entry listing the FaceCrafter applications on a model


class FaceCrafterApplication(BranchCache):
    """One Apply FaceCrafter: a switched condition per module given (tokens computed once, at apply time)."""

    @property
    def active_modules(self) -> tuple[str, ...]:
        return tuple(name for name in MODULE_NAMES if name in self.conditions and self.conditions[name].strength != 0.0)


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
    given = {"lmk": (landmark_tokens, lmk_strength, "the landmark image"), "emo": (emotion_tokens, emo_strength, "the emotion")}
    conditions = {name: SwitchedCondition(getattr(crafter, name), tokens.detach(), strength, MODULE_NAMES.index(name), what)
                  for name, (tokens, strength, what) in given.items() if tokens is not None}
    application = FaceCrafterApplication(conditions, gate)
    layers = {layer.comfy_key: layer for module in crafter.modules_present().values() for layer in module.layers}
    install_branch_patches(patched, application, layers.values(), f"expression_adapters.facecrafter.{id(application)}")
    patched.model_options[APPLICATIONS_KEY] = (*patched.model_options.get(APPLICATIONS_KEY, ()), application)
    return patched


def facecrafter_applications(model) -> tuple[FaceCrafterApplication, ...]:
    return tuple(model.model_options.get(APPLICATIONS_KEY, ()))
