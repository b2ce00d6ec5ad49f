"""Nodes for the Reference Adapter: edit a real photo's expression, keeping its look and background."""

from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import io

from ..adapters.lora import ReferenceLora
from ..encoders.face_align import aligned_portraits
from .reference_patch import apply_reference_adapter
from .types import FaceAnalyzerType, ReferenceAdapterType

CATEGORY = "expression_adapters"
REFERENCE_SIZE = 512  # the Reference UNet sees the aligned face at Arc2Face's training resolution


def single_conditioning(conditioning) -> torch.Tensor:
    """The one tensor of a one-entry conditioning: the Reference UNet runs on a single ID conditioning."""
    if len(conditioning) != 1:
        if not conditioning:
            raise ValueError("id_conditioning is empty: connect the positive output of Arc2Face ID Conditioning")
        raise ValueError(
            f"id_conditioning has {len(conditioning)} entries (a combined or concatenated conditioning); the Reference "
            "UNet runs on one ID conditioning: connect the positive output of Arc2Face ID Conditioning directly"
        )
    return conditioning[0][0]


class LoadReferenceAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadReferenceAdapter",
            display_name="Load Reference Adapter",
            category=f"{CATEGORY}/loaders",
            description="Loads the Reference Adapter LoRA (ref_adapter/pytorch_lora_weights.safetensors as published) "
                        "from ComfyUI/models/expression_adapters.",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("expression_adapters"))],
            outputs=[ReferenceAdapterType.Output(display_name="reference_adapter")],
        )

    @classmethod
    def execute(cls, lora_name):
        return io.NodeOutput(ReferenceLora.from_file(folder_paths.get_full_path_or_raise("expression_adapters", lora_name)))


class ApplyReferenceAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersApplyReferenceAdapter",
            display_name="Apply Reference Adapter",
            category=f"{CATEGORY}/apply",
            description="Conditions generation on a reference photo (Reference UNet + self-attention LoRA), so an "
                        "expression edit keeps the photo's look and background. With a face analyzer connected the "
                        f"reference face is aligned to a {REFERENCE_SIZE}x{REFERENCE_SIZE} portrait, as Arc2Face saw in "
                        "training; without one the image is centre-cropped to a square and resized. "
                        "Composes with Apply Expression Adapter in either order, and stacks with other packs' "
                        "self-attention replaces (they still run for every row).",
            inputs=[
                io.Model.Input("model"),
                ReferenceAdapterType.Input("reference_adapter"),
                io.Vae.Input("vae"),
                io.Image.Input("reference_image", tooltip="One reference, or one per output image"),
                io.Conditioning.Input("id_conditioning", tooltip="The positive output of Arc2Face ID Conditioning "
                                      "(one entry: a combined conditioning is refused)"),
                io.Float.Input("lora_strength", default=ReferenceLora.default_strength, min=0.0, max=2.0, step=0.05,
                               tooltip="Lower trades faithfulness to the reference for expression fidelity (paper Fig. 9)"),
                FaceAnalyzerType.Input("face_analyzer", optional=True,
                                       tooltip="Aligns the reference face (largest face); without it the reference "
                                               "should already be an aligned portrait"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, reference_adapter, vae, reference_image, id_conditioning, lora_strength, face_analyzer=None):
        import comfy.utils

        context = single_conditioning(id_conditioning)
        if face_analyzer is not None:
            pixels = aligned_portraits(face_analyzer, reference_image, REFERENCE_SIZE)
        else:
            pixels = comfy.utils.common_upscale(reference_image[..., :3].movedim(-1, 1), REFERENCE_SIZE, REFERENCE_SIZE,
                                                "bilinear", "center").movedim(1, -1)
        latent = vae.encode(pixels)
        patched, _ = apply_reference_adapter(model, reference_adapter, latent, context, lora_strength)
        return io.NodeOutput(patched)


NODES = [LoadReferenceAdapter, ApplyReferenceAdapter]
