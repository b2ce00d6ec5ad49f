"""ComfyUI host for the Reference Adapter: capture reference features once, read them every step.

Write: the model as it came in (without our LoRA or adapters) runs once, at timestep 0, on the
clean latent of the reference face with the ID conditioning, under ComfyUI's memory management;
an ``attn1_patch`` records every transformer block's ``norm1`` output.

Read: an ``attn1`` replace per self-attention layer. Conditional rows attend over their own
tokens plus the recorded ones, projected by the block's own ``to_k``/``to_v`` (LoRA-patched by
ComfyUI's weight patching): the recorded tokens are a branch condition of ``adapters.branches``
(``adapters.reference.ReferenceCondition``), which lays out the reading rows, and
``attend_with_reference`` combines them with the layer's own. Unconditional rows run exactly the computation of the unpatched model,
so they stay bit-identical to it; that is why this is a replace and not an ``attn1_patch``
lengthening the context for every row. The replace registered before ours (another pack's) runs
for every row: for conditional rows it gets their keys/values with the reference's appended, so
the Reference Adapter stacks with other ``attn1`` replaces (either key form, and other packs' ``.add``:
see ``stacking``). Which rows read is the shared row
layout of ``adapters.rows`` (``cond_or_uncond``, a guider's conditional map, context windows).

The LoRA goes through ``ModelPatcher.add_patches`` with native keys, so it composes with other
LoRAs, low-VRAM loading and ``unpatch_model``.
"""

from __future__ import annotations

import torch

from ...adapters.layers import SD15, self_attention_layers
from ...adapters.reference import ReferenceCondition, ReferenceLayer, attend_with_reference
from ...adapters.rows import COND, RowLayout
from .attention import transformer_blocks
from .cross_attention import PerRunCache
from .stacking import StackableReplace, install_replaces


def check_sd15(model, kind: str) -> None:
    diffusion_model = model.get_model_object("diffusion_model")
    keys = set(transformer_blocks(diffusion_model)) if hasattr(diffusion_model, "input_blocks") else set()
    if keys != {layer.comfy_key for layer in self_attention_layers(SD15)}:
        raise ValueError(f"the {kind} supports SD1.5-family models (Arc2Face) only; this model has {len(keys)} "
                         "transformer blocks (SDXL has 70, SD1.5 16)")


class ReferenceFeatures(PerRunCache):
    """The recorded ``norm1`` outputs, {patch key: (references, tokens, width)} on the offload device, as the
    :class:`~...adapters.reference.ReferenceCondition` every block reads.

    Their keys/values come from the block's LoRA-patched weights, fixed within a sampling run but not
    between runs, so they are projected once per run (the per-run cache wraps the condition).
    """

    def __init__(self):
        super().__init__()
        self.features: dict[tuple[str, int, int], torch.Tensor] = {}
        self.condition = ReferenceCondition(self.features)
        self.captures = 0  # how many times the write pass ran (tests check: once per generation)

    def keys_values(self, layer: ReferenceLayer, layout: RowLayout, device, dtype):
        """The condition's keys/values for ``layer``: one row per reading row of ``layout``."""
        return self.condition_keys_values(self.condition, layer, (layer.key,), layout, device, dtype)

    def record(self, n, context, value, extra_options):
        block = extra_options["block"]
        self.features[(block[0], block[1], extra_options.get("block_index", 0))] = n.detach().to("cpu", torch.float32)
        return n, context, value

    @property
    def num_references(self) -> int:
        return self.condition.references


def capture_reference_features(model, latent: torch.Tensor, context: torch.Tensor) -> ReferenceFeatures:
    """Run ``model`` once at timestep 0 on the clean ``latent`` and record every block's ``norm1`` output."""
    import comfy.model_management

    features = ReferenceFeatures()
    comfy.model_management.load_models_gpu([model])
    base_model = model.model
    device = model.load_device
    sampling = base_model.model_sampling
    sigma = sampling.sigma(torch.zeros(1)).to(device)  # the sigma of timestep 0
    # apply_model divides the input by sqrt(sigma^2 + 1): undo it so the UNet sees the clean latent
    x = base_model.process_latent_in(latent.to(device)) * (sigma**2 + 1).sqrt()
    context = context.to(device)
    if context.shape[0] == 1 and x.shape[0] > 1:
        context = context.expand(x.shape[0], -1, -1)
    # only the recorder: the Reference UNet runs without our (or anyone's) adapters
    options = {"patches": {"attn1_patch": [features.record]}, "cond_or_uncond": [COND]}
    with torch.no_grad():
        base_model.apply_model(x, sigma.expand(x.shape[0]), c_crossattn=context, transformer_options=options)
    features.captures += 1
    return features


class ReferenceAttentionPatch(StackableReplace):
    """The ``attn1`` replace for one transformer block."""

    def __init__(self, features: ReferenceFeatures, key, attn1: torch.nn.Module, previous=None):
        super().__init__(key, previous)
        self.features = features
        self.layer = ReferenceLayer(key, attn1)

    def __call__(self, q, k, v, extra_options):
        layout = RowLayout.of(q.shape[0], extra_options)
        reads = self.features.condition.scales(layout, extra_options)
        reference = self.features.keys_values(self.layer, layout, q.device, q.dtype) if reads.any() else (None, None)

        def attention(q, k, v, reading):
            # the earlier replace sees the rows it gets, with their own chunks in cond_or_uncond
            chunks = [index for index in layout.chunks if layout.conditional(index) == reading]
            return self.attention_before(q, k, v, {**extra_options, "cond_or_uncond": chunks})

        out = attend_with_reference(q, k, v, reads, *reference, attention)
        return self.run_added(out, q, k, v, extra_options)


def native_lora_patches(model, lora, strength: float) -> dict:
    """{native weight key: LoRA adapter} through ComfyUI's own diffusers->ComfyUI key mapping."""
    import comfy.utils
    from comfy.weight_adapter.lora import LoRAAdapter

    unet_config = model.model.model_config.unet_config
    diffusers_to_comfy = comfy.utils.unet_to_diffusers(unet_config)
    patches = {}
    for module, weights in lora.modules.items():
        native = f"diffusion_model.{diffusers_to_comfy[f'{module}.weight']}"
        patches[native] = LoRAAdapter(set(), (weights.up, weights.down, weights.alpha, None, None, None))
    return patches


def apply_reference_adapter(model, lora, latent: torch.Tensor, context: torch.Tensor, lora_strength: float):
    """A clone of ``model`` reading reference features captured now from ``model`` itself, with the LoRA on."""
    from comfy.patcher_extension import WrappersMP
    check_sd15(model, lora.kind)
    features = capture_reference_features(model, latent, context)
    patched = model.clone()
    patches = native_lora_patches(patched, lora, lora_strength)
    applied = patched.add_patches(patches, lora_strength)
    if len(applied) != len(patches):
        raise ValueError(f"{lora.kind}: {len(patches) - len(applied)} LoRA weights have no matching model weight")
    blocks = transformer_blocks(patched.model.diffusion_model)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "expression_adapters.reference", features.sampling_wrapper)
    install_replaces(patched, "attn1", [layer.comfy_key for layer in self_attention_layers(SD15)],
                     lambda key, previous: ReferenceAttentionPatch(features, key, blocks[key].attn1, previous))
    return patched, features
