"""Reading encoder weight files: safetensors, or ``.bin``/``.pt``/``.pth`` through ``weights_only``.

(``adapters.checkpoints`` does the same for adapter files; the two packages do not import each
other, since each must import both as part of the ComfyUI pack and as top-level packages.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def read_checkpoint(path) -> Mapping:
    """A weight file's contents as saved, on the CPU; pickles only as data (``weights_only``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dictionary of tensors")
    return loaded
