"""Reading and writing adapter weight files: safetensors, or ``.bin``/``.pt`` via ``weights_only``.

Published IP-Adapter-style files are nested ``{"image_proj": {...}, "ip_adapter": {...}}`` when
pickled, and flat with ``image_proj.``/``ip_adapter.`` prefixes as safetensors; both read into the
same nested form here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class AdapterFileError(ValueError):
    """A weight file that does not fit the adapter it was loaded as."""

    def __init__(self, path, kind: str, base_model: str, problem: str):
        self.path = str(path)
        super().__init__(f"{os.path.basename(self.path)} is not a valid {kind} for {base_model}: {problem} (file: {self.path})")


def read_checkpoint(path) -> Mapping:
    """A weight file's contents as saved (nesting kept), on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if path.lower().endswith(PICKLE_SUFFIXES):
        # weights_only: a checkpoint is data, never code to run.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dictionary of tensors")
        return loaded
    raise ValueError(f"{path}: unsupported weight file type; use .safetensors (preferred), .bin, .pt or .pth")


def read_safetensors_metadata(path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other files)."""
    path = os.fspath(path)
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata() or {})


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, flat (nested dictionaries joined with dots), on the CPU."""
    return flatten(read_checkpoint(path))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def split_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.``, with the prefix removed."""
    start = prefix + "."
    return {key[len(start):]: value for key, value in state_dict.items() if key.startswith(start)}


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a crash never leaves a half-written file under the final name."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    temporary = f"{path}.partial"
    save_file(tensors, temporary, metadata=metadata)
    os.replace(temporary, path)


def describe_key_mismatch(expected: Iterable[str], found: Iterable[str], limit: int = 8) -> str:
    expected, found = set(expected), set(found)
    parts = []
    for label, keys in (("missing keys", expected - found), ("unexpected keys", found - expected)):
        if keys:
            shown = sorted(keys)[:limit]
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{label}: {', '.join(shown)}{more}")
    return "; ".join(parts)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path, kind: str, base_model: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file, the adapter and the mismatch."""
    expected = module.state_dict()
    problem = describe_key_mismatch(expected, state_dict)
    if not problem:
        shapes = [
            f"{key}: file {tuple(value.shape)} vs expected {tuple(expected[key].shape)}"
            for key, value in state_dict.items()
            if tuple(value.shape) != tuple(expected[key].shape)
        ]
        problem = "shape mismatch: " + "; ".join(shapes[:8]) if shapes else ""
    if problem:
        raise AdapterFileError(path, kind, base_model, problem)
    module.load_state_dict(state_dict, strict=True)


EXPRESSION_ADAPTER_FILE, REFERENCE_LORA_FILE = "expression_adapter", "reference_lora"
E_ADAPTER_FILE, FACECRAFTER_FILE = "e_adapter", "facecrafter"  # our own formats: safetensors only


def safetensors_keys(path) -> list[str]:
    """The tensor names of a .safetensors file, read from its header alone (cheap for large files)."""
    import json

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return [key for key in header if key != "__metadata__"]


def adapter_file_kind(path) -> str | None:
    """Which of our adapter files ``path`` is: :data:`EXPRESSION_ADAPTER_FILE` (``image_proj``/``ip_adapter``
    keys), :data:`REFERENCE_LORA_FILE` (LoRA keys), :data:`E_ADAPTER_FILE` (``id.*``/``exp.*``),
    :data:`FACECRAFTER_FILE` (``lmk.*``/``emo.*``), or None. Safetensors files are told by their keys
    (header only); pickled files cannot be read without loading them, so they are told by name: a name
    with ``lora``, ``ref_adapter`` or starting ``ref`` is a Reference LoRA, any other a candidate Expression Adapter (published as
    ``exp_adapter.bin``)."""
    name = os.fspath(path).lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        try:
            keys = safetensors_keys(path)
        except (OSError, ValueError, struct.error):  # unreadable or truncated: not listed
            return None
        if any("lora" in key for key in keys):
            return REFERENCE_LORA_FILE
        if any(key.startswith(("image_proj.", "ip_adapter.")) for key in keys):
            return EXPRESSION_ADAPTER_FILE
        if any(key.startswith(("id.", "exp.")) for key in keys):
            return E_ADAPTER_FILE
        if any(key.startswith(("lmk.", "emo.")) for key in keys):
            return FACECRAFTER_FILE
        return None
    if name.endswith(PICKLE_SUFFIXES):
        reference = "lora" in name or "ref_adapter" in name or os.path.basename(name).startswith("ref")
        return REFERENCE_LORA_FILE if reference else EXPRESSION_ADAPTER_FILE
    return None
