"""ComfyUI host for the E-Adapter: two stacked cross-attention branches plus the FaceID LoRA.

The ID branch goes on every cross-attention layer, the expression branch on its layer set, each
through ``apply_cross_attention_branch`` (so they stack with each other, our other branches,
IPAdapter and InstantID, follow ``cond_or_uncond`` and gate by sigma). The FaceID LoRA, when the
adapter carries one, goes through ``ModelPatcher.add_patches`` with native keys (ComfyUI's own
diffusers->ComfyUI mapping), as the Reference Adapter's LoRA does.
"""

from __future__ import annotations

import torch

from ...adapters.e_adapter import EAdapter
from .cross_attention import apply_cross_attention_branch, check_model_fits
from .reference import native_lora_patches

RECOGNIZER_ATTRIBUTE = "recognizer"  # set on ARCFACE_EMBEDDING tensors by Face Embed


def check_recognizer(adapter: EAdapter, embeddings: torch.Tensor) -> None:
    """Refuse identity embeddings from another recogniser: each ArcFace model has its own embedding space."""
    made_by = getattr(embeddings, RECOGNIZER_ATTRIBUTE, None)
    if made_by is not None and made_by != adapter.id_recognizer:
        raise ValueError(
            f"the identity embedding was made by {made_by}, but the E-Adapter's ID branch (IP-Adapter FaceID) was "
            f"trained on {adapter.id_recognizer} embeddings, a different embedding space: in Load InsightFace set "
            f"recognizer to buffalo_l/{adapter.id_recognizer} (insightface's buffalo_l pack) and run Face Embed again")


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


def apply_e_adapter(model, adapter: EAdapter, id_embeddings: torch.Tensor | None = None,
                    image_embeds: torch.Tensor | None = None, id_strength: float = 1.0, expression_strength: float = 1.0,
                    expression_layers: str = "auto", start_at: float = 0.0, end_at: float = 1.0,
                    lora_strength: float = 1.0):
    """A clone of ``model`` with the E-Adapter's branches; either condition may be left out."""
    if id_embeddings is None and image_embeds is None:
        raise ValueError("Apply E-Adapter needs an identity embedding, a CLIP vision output of the expression photo, or both")
    check_model_fits(adapter.identity, model)
    expression = adapter.expression_branch(expression_layers)
    with torch.no_grad():
        if id_embeddings is not None:
            check_recognizer(adapter, id_embeddings)
            id_tokens = adapter.id_tokens(id_embeddings)
        if image_embeds is not None:
            expression_tokens = adapter.expression_tokens(image_embeds)
    patched = apply_faceid_lora(model, adapter, lora_strength)
    if id_embeddings is not None:
        patched = apply_cross_attention_branch(patched, adapter.identity, id_tokens, adapter.unconditional_id_tokens(),
                                               id_strength, start_at, end_at, what="identity embedding")
    if image_embeds is not None:
        patched = apply_cross_attention_branch(patched, expression, expression_tokens,
                                               adapter.unconditional_expression_tokens(), expression_strength, start_at, end_at,
                                               what="expression image")
    return patched
