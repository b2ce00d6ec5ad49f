"""Nodes for the Reference Adapter: edit a real photo's expression, keeping its look and background."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..adapters.checkpoints import REFERENCE_LORA_FILE, adapter_file_kind
from ..adapters.lora import ReferenceLora
from ..encoders.face_align import aligned_portraits
from ..hosts.comfyui.reference import apply_reference_adapter
from .model_folders import model_choices, model_file
from .types import FaceAnalyzerType, ReferenceAdapterType
from .validation import check_choices, check_numbers

CATEGORY = "expression_adapters"
REFERENCE_LORA_NAME = "ref_adapter/pytorch_lora_weights.safetensors"
REFERENCE_LORA_SOURCE = ("hub repo FoivosPar/Arc2Face, file ref_adapter/pytorch_lora_weights.safetensors "
                         "(https://huggingface.co/FoivosPar/Arc2Face)")
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
            inputs=[io.Combo.Input("lora_name", options=model_choices("expression_adapters", REFERENCE_LORA_NAME,
                                                                      lambda path: adapter_file_kind(path) == REFERENCE_LORA_FILE),
                                   tooltip="File in ComfyUI/models/expression_adapters "
                                           "(ref_adapter/pytorch_lora_weights.safetensors as published)")],
            outputs=[ReferenceAdapterType.Output(display_name="reference_adapter")],
        )

    @classmethod
    def execute(cls, lora_name):
        check_choices(cls, {"lora_name": "expression_adapters"}, lora_name=lora_name)
        return io.NodeOutput(ReferenceLora.from_file(model_file("expression_adapters", lora_name, REFERENCE_LORA_SOURCE)))


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
                io.Model.Input("model", tooltip="The Arc2Face UNet (Load Diffusion Model), possibly already patched"),
                ReferenceAdapterType.Input("reference_adapter", tooltip="From Load Reference Adapter"),
                io.Vae.Input("vae", tooltip="The SD1.5 VAE: encodes the reference photo for the Reference UNet"),
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
        check_numbers(cls, lora_strength=lora_strength)
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
