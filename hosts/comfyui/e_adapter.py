"""ComfyUI host for the E-Adapter: two stacked cross-attention branches plus the FaceID LoRA.

The node computes the two branches' tokens and gives them as branch conditions (``TokenCondition``); here
the ID branch goes on every cross-attention layer, the expression branch on its layer set, each
through ``apply_token_condition`` (so they stack with each other, our other branches,
IPAdapter and InstantID, follow ``cond_or_uncond`` and gate by sigma). The FaceID LoRA, when the
adapter carries one, goes through ``ModelPatcher.add_patches`` with native keys (ComfyUI's own
diffusers->ComfyUI mapping), as the Reference Adapter's LoRA does.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...adapters.branches import TokenCondition
from ...adapters.e_adapter import EAdapter
from .cross_attention import apply_token_condition, check_model_fits
from .reference import native_lora_patches


def apply_faceid_lora(model, adapter: EAdapter, strength: float):
    """A clone of ``model`` with the FaceID LoRA at ``strength`` (``model`` itself when there is none or 0): the
    separate LoRA file Load E-Adapter chose (``adapter.lora_file``), else the one inside the FaceID file."""
    if strength == 0.0:
        return model
    if adapter.lora_file:
        return apply_lora_file(model, adapter.lora_file, strength)
    if not adapter.lora:
        return model
    patched = model.clone()
    patches = native_lora_patches(patched, adapter.lora_weights(), strength)
    applied = patched.add_patches(patches, strength)
    if len(applied) != len(patches):
        raise ValueError(f"{adapter.kind}: {len(patches) - len(applied)} FaceID LoRA weights have no matching model weight")
    return patched


def apply_lora_file(model, path: str, strength: float):
    """A LoRA file through ComfyUI's own loader and key mapping, as Load LoRA (model only) does."""
    import comfy.lora
    import comfy.utils

    state = comfy.utils.load_torch_file(path, safe_load=True)
    patches = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    if not patches:
        raise ValueError(f"{path}: no LoRA weight of this file fits the model (is it the FaceID LoRA for this base?)")
    patched = model.clone()
    patched.add_patches(patches, strength)
    return patched


def install_e_adapter(model, adapter: EAdapter, conditions: Mapping[str, TokenCondition], start_at: float = 0.0,
                      end_at: float = 1.0, lora_strength: float = 1.0):
    """A clone of ``model`` with the FaceID LoRA and the E-Adapter's branch conditions, each named by what it
    reads (``{"identity embedding": ..., "expression image": ...}``, either left out), in that order."""
    check_model_fits(adapter.identity, model)
    patched = apply_faceid_lora(model, adapter, lora_strength)
    for name, condition in conditions.items():
        patched = apply_token_condition(patched, condition, start_at, end_at, name)
    return patched
