"""Random tiny models built from config blocks, for the smoke config, tests and benchmarks.

They are the real diffusers / transformers classes with narrow widths, so every code path of
training (processors, checkpointing, LoRA, sampling) runs as with Arc2Face, only faster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

# The tiny SD1.5-shaped UNet, every SD1.5 block present; the tests (tests/tiny_unets.py) build theirs from it.
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
