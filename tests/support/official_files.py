"""Full-size random weights written in the published file formats, for end-to-end workflow runs.

ComfyUI recognises SD1.5 UNets, CLIP-L and the SD VAE by their real shapes, so these are full size
(about 1.1 billion parameters, 2.2 GB in fp16). They are written once and cached between runs
under ``$EXPRESSION_ADAPTERS_TEST_CACHE`` (default ``~/.cache/expression_adapters_tests``), in
ComfyUI's models-folder layout with the file names the README tells users to use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from support.cache_locks import filling

VERSION = "v1"
UNET_FILE = "diffusion_models/arc2face/diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE = "text_encoders/arc2face/pytorch_model.bin"
# The same encoder weights in the hub's folder layout, for the Load Arc2Face ID Encoder node.
ID_ENCODER_DIR = "arc2face/encoder"
VAE_FILE = "vae/sd-vae-ft-mse/diffusion_pytorch_model.safetensors"
EXPRESSION_ADAPTER_FILE = "expression_adapters/exp_adapter.bin"
REFERENCE_LORA_FILE = "expression_adapters/ref_adapter/pytorch_lora_weights.safetensors"

SD15_UNET_CONFIG = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
SD15_WIDTHS = {"down_blocks": (320, 640, 1280), "up_blocks": (None, 1280, 640, 320), "mid_block": (1280,)}


def official_models_dir() -> Path:
    with filling(f"official-random-{VERSION}") as models:
        if not (models / ".complete").exists():
            _write_all(models)
            (models / ".complete").write_text("ok")
        if not (models / ID_ENCODER_DIR / ".complete").exists():  # added after v1: caches from before lack it
            _write_id_encoder_folder(models)
        if not (models / REFERENCE_LORA_FILE).exists():  # added after v1 too
            _write_reference_lora(models / REFERENCE_LORA_FILE)
    return models


def _write_all(models: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    for name in (UNET_FILE, TEXT_ENCODER_FILE, VAE_FILE, EXPRESSION_ADAPTER_FILE):
        (models / name).parent.mkdir(parents=True, exist_ok=True)

    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    save_file(_half(unet.state_dict()), models / UNET_FILE)
    unet.save_config(models / UNET_FILE.rsplit("/", 1)[0])
    del unet

    text_encoder = CLIPTextModel(_text_encoder_config())
    # Published with transformers 4, whose CLIPTextModel keys start with "text_model."
    state = {key if key.startswith("text_model.") else f"text_model.{key}": value
             for key, value in text_encoder.state_dict().items()}
    torch.save(_half(state), models / TEXT_ENCODER_FILE)
    del text_encoder

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
    save_file(_half(vae.state_dict()), models / VAE_FILE)
    del vae

    torch.save(_expression_adapter_state(), models / EXPRESSION_ADAPTER_FILE)
    _write_id_encoder_folder(models)


def _text_encoder_config():
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77)
    config.architectures = ["CLIPTextModel"]
    return config


def _write_id_encoder_folder(models: Path) -> None:
    """``arc2face/encoder/``: config.json + pytorch_model.bin (``text_model.*`` keys, as published), the
    weights being the text-encoder file above (hard-linked where the file system allows, else copied)."""
    import shutil

    folder = models / ID_ENCODER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    _text_encoder_config().to_json_file(folder / "config.json")
    weights = folder / "pytorch_model.bin"
    weights.unlink(missing_ok=True)
    try:
        os.link(models / TEXT_ENCODER_FILE, weights)
    except OSError:
        shutil.copyfile(models / TEXT_ENCODER_FILE, weights)
    (folder / ".complete").write_text("ok")


def _expression_adapter_state() -> dict:
    """exp_adapter.bin as published: nested image_proj (MLP form) and ip_adapter dicts."""
    from adapters.layers import SD15, cross_attention_layers

    generator = torch.Generator().manual_seed(1)

    def normal(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    image_proj = {"proj.0.weight": normal(110, 55, std=0.1), "proj.0.bias": torch.zeros(110),
                  "proj.2.weight": normal(4 * 768, 110, std=0.1), "proj.2.bias": torch.zeros(4 * 768),
                  "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    ip_adapter = {}
    for layer in cross_attention_layers(SD15):
        block, index = layer.diffusers_name.split(".")[:2]
        width = SD15_WIDTHS[block][0 if block == "mid_block" else int(index)]
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{layer.checkpoint_number}.{name}.weight"] = normal(width, 768, std=768**-0.5)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _write_reference_lora(path: Path) -> None:
    """ref_adapter/pytorch_lora_weights.safetensors as published: rank 128, ``unet.*.lora.down/up`` keys."""
    from adapters.checkpoints import write_safetensors
    from adapters.layers import SD15, self_attention_layers
    from adapters.lora import SELF_ATTENTION_TARGETS

    generator = torch.Generator().manual_seed(2)
    state = {}
    for layer in self_attention_layers(SD15):
        block, index = layer.diffusers_name.split(".")[:2]
        width = SD15_WIDTHS[block][0 if block == "mid_block" else int(index)]
        for target in SELF_ATTENTION_TARGETS:
            module = f"unet.{layer.diffusers_name}.{target}"
            state[f"{module}.lora.down.weight"] = torch.randn(128, width, generator=generator) * width**-0.5
            state[f"{module}.lora.up.weight"] = torch.randn(width, 128, generator=generator) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(_half(state), path)


def _half(state: dict) -> dict:
    return {key: value.detach().to(torch.float16).contiguous() for key, value in state.items()}
