"""Tiny SD1.5- and SDXL-shaped UNets (every block present, narrow channels) for both hosts.

The same random weights exist in diffusers form (``UNet2DConditionModel``) and, converted with
ComfyUI's own key mapping (``comfy.utils.unet_to_diffusers``), in ComfyUI form.
"""

from __future__ import annotations

import torch

from adapters.expression_adapter import FLAME_DIM, ExpressionAdapter
from adapters.layers import SD15, SDXL, cross_attention_layers
from adapters.projections import MLPProjection, TokenProjection
from training.tiny import TINY_UNET_DEFAULTS, tiny_unet

CHANNELS = TINY_UNET_DEFAULTS["block_out_channels"][0]
CONTEXT_DIM = TINY_UNET_DEFAULTS["cross_attention_dim"]
TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim, narrowed
SDXL_POOLED_DIM = 32


def diffusers_unet(family: str, seed: int = 0, context_dim: int = CONTEXT_DIM):
    """``context_dim``: the text/IP token width (2048 where another pack tells SDXL from it, as IPAdapter_plus does)."""
    from diffusers import UNet2DConditionModel

    if family == "SD1.5":  # the training package's tiny UNet (its smoke config runs the same one)
        return tiny_unet({"seed": seed, "cross_attention_dim": context_dim}).eval()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(CHANNELS, 2 * CHANNELS, 4 * CHANNELS),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        attention_head_dim=(1, 1, 2),  # ComfyUI gives SDXL one head per 64 channels
        cross_attention_dim=context_dim, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * TIME_EMBED_DIM, norm_num_groups=32, layers_per_block=2,
    )
    return unet.eval()


def comfy_unet_config(family: str, context_dim: int = CONTEXT_DIM) -> dict:
    common = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": CHANNELS,
              "use_spatial_transformer": True, "legacy": False, "context_dim": context_dim,
              "use_temporal_attention": False, "use_temporal_resblock": False}
    if family == "SD1.5":
        return common | {"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                         "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1,
                         "use_linear_in_transformer": False, "adm_in_channels": None, "num_heads": 8, "num_head_channels": -1}
    return common | {"num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
                     "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
                     "use_linear_in_transformer": True, "adm_in_channels": SDXL_POOLED_DIM + 6 * TIME_EMBED_DIM,
                     "num_classes": "sequential", "num_heads": -1, "num_head_channels": 64}


def comfy_model(family: str, diffusers_state_dict: dict, dtype: torch.dtype = torch.float32):
    """A ComfyUI ModelPatcher holding the same weights, converted with ComfyUI's own mapping, built and computing
    in ``dtype`` (as ComfyUI builds a UNet in fp16/bf16 on a GPU)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    context_dim = next(v for k, v in diffusers_state_dict.items() if k.endswith("attn2.to_k.weight")).shape[1]
    unet_config = comfy_unet_config(family, context_dim)
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    comfy_sd = {comfy_key: diffusers_state_dict[diffusers_key] for diffusers_key, comfy_key in mapping.items()
                if diffusers_key in diffusers_state_dict}
    config_class = comfy.supported_models.SD15 if family == "SD1.5" else comfy.supported_models.SDXL
    model_config = config_class(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict({k: v.to(dtype) for k, v in comfy_sd.items()}, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def sdxl_added_conditions(unet, batch: int, seed: int = 1):
    """diffusers' SDXL extra inputs, and the matching ComfyUI ``y`` vector."""
    generator = torch.Generator().manual_seed(seed)
    text_embeds = torch.randn(batch, SDXL_POOLED_DIM, generator=generator)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(batch, -1)
    return {"text_embeds": text_embeds, "time_ids": time_ids}, torch.cat([text_embeds, time_embeds], dim=-1)


def random_expression_adapter(family: str = "SD1.5", mlp: bool = False, seed: int = 0, token_dim: int = CONTEXT_DIM,
                              num_tokens: int = 4) -> ExpressionAdapter:
    """An Expression Adapter with random weights for the tiny UNet of ``family``."""
    torch.manual_seed(seed)
    layout = SD15 if family == "SD1.5" else SDXL
    widths = {layer.checkpoint_number: tiny_width(layout, layer) for layer in cross_attention_layers(layout)}
    projection = MLPProjection(FLAME_DIM, token_dim, num_tokens) if mlp else TokenProjection(FLAME_DIM, token_dim, num_tokens)
    adapter = ExpressionAdapter(projection, layout, widths)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0.0, 0.3)
    return adapter.eval()


def tiny_width(layout, layer) -> int:
    """The query width of a catalogue layer in the tiny UNet of ``layout``."""
    mult = [1, 2, 4, 4] if layout is SD15 else [1, 2, 4]
    block, index = layer.diffusers_name.split(".")[:2]
    if block == "mid_block":
        return CHANNELS * mult[-1]
    level = int(index) if block == "down_blocks" else len(mult) - 1 - int(index)
    return CHANNELS * mult[level]


def random_reference_lora_state(rank: int = 4, seed: int = 0, form: str = "diffusers", alpha: float | None = None) -> dict:
    """A Reference Adapter LoRA for the tiny SD1.5 UNet, in one of the published key forms."""
    from adapters.layers import self_attention_layers
    from adapters.lora import SELF_ATTENTION_TARGETS

    generator = torch.Generator().manual_seed(seed)
    down_key, up_key, prefix = {"diffusers": ("lora.down", "lora.up", "unet."), "peft": ("lora_A", "lora_B", "")}[form]
    state = {}
    for layer in self_attention_layers(SD15):
        width = tiny_width(SD15, layer)
        for target in SELF_ATTENTION_TARGETS:
            module = f"{prefix}{layer.diffusers_name}.{target}"
            state[f"{module}.{down_key}.weight"] = torch.randn(rank, width, generator=generator) * 0.2
            state[f"{module}.{up_key}.weight"] = torch.randn(width, rank, generator=generator) * 0.2
            if alpha is not None:
                state[f"{module}.alpha"] = torch.tensor(alpha)
    return state
