"""The frozen host models of training (UNet, VAE, noise schedule, ID encoder) and a new Expression Adapter.

Real models load from local folders only (``local_files_only``: no hub access); the smoke config
and tests build random tiny ones from config blocks (:mod:`training.tiny`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.expression_adapter import FLAME_DIM, ExpressionAdapter
from adapters.layers import LAYOUTS, UNetLayout, cross_attention_layers
from adapters.projections import MLPProjection, TokenProjection

from . import tiny

# SD1.5's training schedule (Arc2Face keeps it): scaled-linear betas 0.00085..0.012 over 1000 steps.
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1,
                  "prediction_type": "epsilon"}


@dataclass
class HostModels:
    unet: torch.nn.Module
    noise_scheduler: object
    id_encoder: object | None
    vae: torch.nn.Module | None
    latent_scale: float
    latent_shift: float


def load_unet(model_cfg: Mapping, device, dtype):
    if model_cfg.get("tiny_unet") is not None:
        unet = tiny.tiny_unet(model_cfg["tiny_unet"])
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model_cfg["unet"], local_files_only=True)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_vae(model_cfg: Mapping, device, dtype):
    if model_cfg.get("tiny_vae") is not None:
        vae = tiny.tiny_vae(model_cfg["tiny_vae"])
    elif model_cfg.get("vae"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_cfg["vae"], local_files_only=True)
    else:
        return None
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_noise_scheduler(path=None):
    """DDPM noise schedule: the base model's ``scheduler_config.json`` (file or folder), else SD1.5's."""
    from diffusers import DDPMScheduler

    if path is None:
        return DDPMScheduler(**SD15_SCHEDULER)
    path = Path(path)
    if path.is_dir():
        path = path / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    return DDPMScheduler.from_config(config)


def load_id_encoder(model_cfg: Mapping, work_dir, device, dtype):
    if model_cfg.get("tiny_id_encoder") is not None:
        encoder = tiny.tiny_id_encoder(model_cfg["tiny_id_encoder"], work_dir, model_cfg.get("tokenizer"))
    else:
        from encoders.arc2face_id import Arc2FaceIDEncoder

        encoder = Arc2FaceIDEncoder.from_folders(model_cfg["id_encoder"], model_cfg["tokenizer"])
    return encoder.to(device=device, dtype=dtype)


def load_host_models(config: Mapping, device, dtype, need_vae: bool) -> HostModels:
    model_cfg = config["model"]
    unet = load_unet(model_cfg, device, dtype)
    vae = load_vae(model_cfg, device, dtype)
    if need_vae and vae is None:
        raise ValueError("this run encodes images with the VAE (no cached latents), but model.vae is not set")
    scale = float(vae.config.scaling_factor) if vae is not None else 0.18215
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0) if vae is not None else 0.0
    # EmojiDiff's stages condition on text, not on Arc2Face's ID encoder: they load their text encoders themselves
    has_id_encoder = model_cfg.get("id_encoder") is not None or model_cfg.get("tiny_id_encoder") is not None
    id_encoder = load_id_encoder(model_cfg, config["output_dir"], device, dtype) if has_id_encoder else None
    if id_encoder is not None and id_encoder.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(f"the ID encoder gives {id_encoder.hidden_size}-d tokens but the UNet's cross-attention "
                         f"reads {unet.config.cross_attention_dim}-d ones; they are not a matching pair")
    return HostModels(unet, load_noise_scheduler(model_cfg.get("scheduler")), id_encoder, vae, scale, shift)


def unet_layout(unet) -> UNetLayout:
    """SD1.5 or SDXL, told by the UNet's cross-attention module names."""
    names = {name for name, _ in unet.named_modules() if name.endswith(".attn2")}
    for layout in LAYOUTS.values():
        if names == {layer.diffusers_name for layer in cross_attention_layers(layout)}:
            return layout
    raise ValueError(f"the UNet has {len(names)} cross-attention layers, neither the SD1.5 (16) nor the SDXL (70) structure")


def unet_widths(unet, layout: UNetLayout) -> dict[int, int]:
    return {layer.checkpoint_number: unet.get_submodule(layer.diffusers_name).to_k.out_features
            for layer in cross_attention_layers(layout)}


def build_expression_adapter(unet, adapter_cfg: Mapping) -> ExpressionAdapter:
    """A new adapter sized for ``unet`` (or the ``init`` file), on the CPU in float32."""
    layout = unet_layout(unet)
    widths = unet_widths(unet, layout)
    token_dim = int(unet.config.cross_attention_dim)
    if adapter_cfg.get("init"):
        adapter = ExpressionAdapter.from_file(adapter_cfg["init"], layout)
        if adapter.token_dim != token_dim or {layer.checkpoint_number: adapter.branch(layer).width for layer in adapter.layers} != widths:
            raise ValueError(f"adapter.init {adapter_cfg['init']} does not fit this UNet (token width "
                             f"{adapter.token_dim} vs {token_dim}, or other layer widths)")
        return adapter.float()
    torch.manual_seed(int(adapter_cfg.get("seed", 0)))
    num_tokens = int(adapter_cfg["num_tokens"])
    if adapter_cfg["projection"] == "mlp":
        projection = MLPProjection(FLAME_DIM, token_dim, num_tokens, adapter_cfg.get("hidden_dim"))
    else:
        projection = TokenProjection(FLAME_DIM, token_dim, num_tokens)
    adapter = ExpressionAdapter(projection, layout, widths)
    if adapter_cfg.get("init_kv_from_unet", True):
        # IP-Adapter's start: the new key/value maps equal the text ones, so the branch begins
        # as a second reading of familiar-looking tokens instead of random noise.
        with torch.no_grad():
            for layer in adapter.layers:
                attn = unet.get_submodule(layer.diffusers_name)
                branch = adapter.branch(layer)
                branch.to_k_ip.weight.copy_(attn.to_k.weight.float().cpu())
                branch.to_v_ip.weight.copy_(attn.to_v.weight.float().cpu())
    return adapter.float()
