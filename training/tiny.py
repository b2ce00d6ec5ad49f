"""Random tiny models and stand-in files built from config blocks, for the smoke config, tests and benchmarks.

They are the real diffusers / transformers classes with narrow widths, so every code path of
training (processors, checkpointing, LoRA, sampling) runs as with Arc2Face, only faster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from adapters.e_adapter import ID_DIM
from adapters.layers import SDXL, UNetLayout, attention_layers

# The tiny SD1.5-shaped UNet, every SD1.5 block present; the tests (tests/support/tiny_unets.py) build theirs from it.
TINY_UNET_DEFAULTS = {
    "sample_size": 8,
    "block_out_channels": [32, 64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "layers_per_block": 2,
}
# Four levels: the same 8x downsampling as SD's VAE.
TINY_VAE_DEFAULTS = {
    "block_out_channels": [8, 8, 8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_ID_ENCODER_DEFAULTS = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
PROMPT_WORDS = ("photo", "of", "a", "id", "person")
# the LoRA of the published FaceID files: its key part -> the attention's module it adapts
LORA_PARTS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def _options(block: Mapping | None, defaults: Mapping) -> tuple[dict, int]:
    options = dict(defaults) | dict(block or {})
    seed = int(options.pop("seed", 0))
    return options, seed


def tiny_unet(block: Mapping | None = None):
    from diffusers import UNet2DConditionModel

    options, seed = _options(block, TINY_UNET_DEFAULTS)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def tiny_vae(block: Mapping | None = None):
    from diffusers import AutoencoderKL

    options, seed = _options(block, TINY_VAE_DEFAULTS)
    torch.manual_seed(seed)
    return AutoencoderKL(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def write_tiny_tokenizer(folder) -> Path:
    """A CLIP BPE vocabulary with the letters and the words of Arc2Face's prompt, in the SD1.5 tokenizer's file layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = list(letters) + [c + "</w>" for c in letters]
    merges = []
    for word in PROMPT_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            if symbols[0] not in vocab:
                vocab.append(symbols[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    files = {"vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}),
             "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}
    for name, text in files.items():
        # every process of a multi-process run writes the same files: never let one read another's half-written file
        partial = folder / f"{name}.{os.getpid()}.partial"
        partial.write_text(text)
        os.replace(partial, folder / name)
    return folder


def tiny_id_encoder(block: Mapping | None, work_dir, tokenizer_folder=None):
    """Arc2Face's ID encoder class around a random tiny CLIPTextModel and a tiny tokenizer (or the SD1.5 tokenizer
    in ``tokenizer_folder``, with a full-size vocabulary, so the encoder also runs behind ComfyUI's tokenizer)."""
    import transformers

    from encoders.arc2face_id import Arc2FaceIDEncoder, load_clip_tokenizer

    options, seed = _options(block, TINY_ID_ENCODER_DEFAULTS)
    tokenizer = load_clip_tokenizer(tokenizer_folder or write_tiny_tokenizer(Path(work_dir) / "tiny_tokenizer"))
    vocab = tokenizer.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos,
                                         eos_token_id=eos, pad_token_id=eos, **options)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval().requires_grad_(False)
    return Arc2FaceIDEncoder(model, tokenizer)


def tiny_recognizer(dim: int = 16, seed: int = 0):
    """A stand-in face recogniser: crop (H x W x 3 uint8) -> L2-normalised ``dim`` vector.

    A fixed random projection of the 16 x 16 grey thumbnail: similar crops give similar vectors,
    which is all a smoke run needs. It is not ArcFace and says nothing about identity.
    """
    import numpy as np

    projection = np.random.default_rng(seed).standard_normal((256, dim)).astype(np.float32)

    def recognize(crop) -> np.ndarray:
        import cv2

        grey = cv2.cvtColor(np.asarray(crop, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
        thumb = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1)
        vector = (thumb - thumb.mean()) / (thumb.std() + 1e-6) @ projection
        return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)

    return recognize


def tiny_clip_vision(block: Mapping | None = None):
    """A random tiny ``CLIPVisionModelWithProjection`` with IP-Adapter ViT-H's 1024-d ``image_embeds`` (a stand-in)."""
    import transformers

    options = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8, "projection_dim": 1024} | dict(block or {})
    seed = int(options.pop("seed", 0))
    torch.manual_seed(seed)
    return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**options)).eval()


# -- stand-ins of EmojiDiff's models ------------------------------------------------------------------


def tiny_text_encoders(block: Mapping, work_dir) -> list[tuple[object, nn.Module]]:
    """Random tiny CLIP text encoders (stand-ins) on the tiny tokenizer: one, or with ``sdxl: true`` SDXL's pair
    (``hidden_size`` each, the second with a ``projection_dim`` pooled output)."""
    import transformers

    from encoders.arc2face_id import load_clip_tokenizer

    options, seed = _options(block, TINY_ID_ENCODER_DEFAULTS)
    sdxl = bool(options.pop("sdxl", False))
    projection_dim = int(options.pop("projection_dim", 32))
    tokenizer = load_clip_tokenizer(write_tiny_tokenizer(Path(work_dir) / "tiny_tokenizer"))
    vocab = tokenizer.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos,
                                         eos_token_id=eos, pad_token_id=eos, projection_dim=projection_dim, **options)
    torch.manual_seed(seed)
    encoders = [(tokenizer, transformers.CLIPTextModel(config))]
    if sdxl:
        encoders.append((tokenizer, transformers.CLIPTextModelWithProjection(config)))
    return encoders


def write_standin_published(unet, layout: UNetLayout, folder, seed: int = 0, lora_rank: int = 4) -> tuple[Path, Path]:
    """Random stand-in files in the published IP-Adapter layouts, sized for ``unet``: a FaceID ``.bin`` (MLP
    projection, every cross-attention layer's K/V, a LoRA on every attention processor) and an image ``.bin``
    (Linear + LayerNorm projection of 1024-d CLIP embeddings, every layer's K/V). For smoke runs and tests.
    ``layout``: the UNet's (``training.models.unet_layout``)."""
    token_dim = int(unet.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(int(seed))

    def random(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    faceid_proj = {"proj.0.weight": random(1024, ID_DIM, std=0.05), "proj.0.bias": torch.zeros(1024),
                   "proj.2.weight": random(4 * token_dim, 1024, std=0.03), "proj.2.bias": torch.zeros(4 * token_dim),
                   "norm.weight": torch.ones(token_dim), "norm.bias": torch.zeros(token_dim)}
    image_proj = {"proj.weight": random(4 * token_dim, 1024, std=0.03), "proj.bias": torch.zeros(4 * token_dim),
                  "norm.weight": torch.ones(token_dim), "norm.bias": torch.zeros(token_dim)}
    faceid_kv, image_kv = {}, {}
    for layer in attention_layers(layout):
        attn, n = unet.get_submodule(layer.diffusers_name), layer.checkpoint_number
        if layer.is_cross:
            for out in (faceid_kv, image_kv):
                for name in ("to_k_ip", "to_v_ip"):
                    out[f"{n}.{name}.weight"] = random(attn.to_k.out_features, token_dim, std=token_dim ** -0.5)
        for part, target in LORA_PARTS.items() if lora_rank else ():
            linear = attn.get_submodule(target)
            faceid_kv[f"{n}.{part}_lora.down.weight"] = random(lora_rank, linear.in_features, std=0.1)
            faceid_kv[f"{n}.{part}_lora.up.weight"] = random(linear.out_features, lora_rank, std=0.01)
    return save_published(folder, layout, {"image_proj": faceid_proj, "ip_adapter": faceid_kv},
                          {"image_proj": image_proj, "ip_adapter": image_kv})


def save_published(folder, layout: UNetLayout, faceid: Mapping, image: Mapping) -> tuple[Path, Path]:
    """The FaceID and image states saved (``torch.save``) under the published file names for ``layout``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "sdxl" if layout is SDXL else "sd15"
    paths = folder / f"ip-adapter-faceid_{suffix}.bin", folder / ("ip-adapter_sdxl_vit-h.bin" if layout is SDXL else "ip-adapter_sd15.bin")
    for path, state in zip(paths, (faceid, image), strict=True):
        temporary = path.with_name(f"{path.name}.{os.getpid()}.partial")  # several processes may write the same file
        torch.save(state, temporary)
        os.replace(temporary, path)
    return paths


def tiny_recognizer_net(block: Mapping | None) -> nn.Module:
    """A random stand-in for ArcFace (112 x 112 RGB -> ``dim``-d): smoke runs and tests only."""
    options = dict(block or {})
    torch.manual_seed(int(options.get("seed", 0)))
    return nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.Conv2d(8, 8, 4, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 7 * 7, int(options.get("dim", 32))))


class TinyFan(nn.Module):
    """A random stand-in for a FAN: 256 x 256 crops -> ``{"heatmap": B x 68 x 16 x 16}`` (smoke runs and tests)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 8, 8), nn.ReLU(), nn.Conv2d(16, 68, 3, 2, 1))

    def forward(self, crops):
        return {"heatmap": self.net(crops)}
