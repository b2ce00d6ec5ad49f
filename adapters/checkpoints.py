"""Reading and writing adapter weight files: safetensors, or ``.bin``/``.pt`` via ``weights_only``.

Published IP-Adapter-style files are nested ``{"image_proj": {...}, "ip_adapter": {...}}`` when
pickled, and flat with ``image_proj.``/``ip_adapter.`` prefixes as safetensors; both read into the
same nested form here.
"""

from __future__ import annotations

import itertools
import json
import logging
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


class WeightFileError(ValueError):
    """A weight file that cannot be read at all: the message names the file, what it should be and why."""

    def __init__(self, path, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"cannot read {os.path.basename(self.path)} as weights: {cause} (file: {self.path})")


MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def not_weights(path, head: bytes) -> str | None:
    """What a file that is not weights at all looks like from its first bytes, or None."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes): its download or copy did not finish"
    if head.startswith(b"version https://git-lfs"):
        return "it is a git-lfs pointer, not the weights: fetch the file itself (git lfs pull, or its download link)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "it is a web page (HTML), not weights: save the file from its download link, not the page around it"
    return None


def _diagnose(path, error: Exception, expected: str) -> str:
    """Our words for a reader's failure: never the reader's advice to load without ``weights_only``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "weights_only" not in line]
    blocked = next((line for line in lines if "GLOBAL" in line), None)
    if blocked:
        return f"it asks to run code when loaded, which is refused: only plain tensors are read ({blocked})"
    detail = next((line for line in lines if line.startswith(("Unsupported", "Error while", "Pytorch", "PytorchStreamReader"))),
                  lines[0] if lines else type(error).__name__)
    return f"not a readable {expected} file, or cut short at {os.path.getsize(path)} bytes ({detail[:200]})"


def read_checkpoint(path) -> Mapping:
    """A weight file's contents as saved (nesting kept), on the CPU; :class:`WeightFileError` for a file that
    is not one (empty, cut short, a web page, a git-lfs pointer, a pickle that would run code)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    lower = path.lower()
    if not lower.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise ValueError(f"{path}: unsupported weight file type; use .safetensors (preferred), .bin, .pt or .pth")
    safetensors = lower.endswith(SAFETENSORS_SUFFIXES)
    if safetensors:
        safetensors_keys(path)  # a sane header first (not_weights included), or our own cause
    else:
        with open(path, "rb") as handle:
            problem = not_weights(path, handle.read(64))
        if problem:
            raise WeightFileError(path, problem)
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        # weights_only: a checkpoint is data, never code to run.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reader failure becomes one message naming the file
        raise WeightFileError(path, _diagnose(path, error, "safetensors" if safetensors else "PyTorch")) from None
    if not isinstance(loaded, Mapping):
        raise WeightFileError(path, f"it holds a {type(loaded).__name__}, not a dictionary of tensors")
    return loaded


def read_safetensors_metadata(path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other files)."""
    path = os.fspath(path)
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return {}
    from safetensors import safe_open

    safetensors_keys(path)  # a sane header first: WeightFileError naming the cause
    try:
        with safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - one message naming the file
        raise WeightFileError(path, _diagnose(path, error, "safetensors")) from None


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


def without_init() -> torch.device:
    """Where a loader builds a module whose every weight comes from a file: ``with without_init(): module = ...``
    puts it on the meta device, so no random initialisation runs (and nothing is allocated) before
    :func:`assign_weights` gives it the file's tensors."""
    return torch.device("meta")


def assign_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Give ``module``, built under :func:`without_init`, the tensors of ``state_dict`` (its exact keys: strict).

    Each tensor ends on the default device in the dtype the module was built with, as ``load_state_dict`` into
    an initialised module would copy it (float32 parameters from a float16 file); one already so is taken as it
    is, not copied. Raises if any tensor is elsewhere: one the file did not fill is still on the meta device."""
    expected = module.state_dict()
    device = torch.empty(0).device  # the default device (torch.get_default_device() exists from torch 2.3 only)
    module.load_state_dict({key: value.detach().to(device=device, dtype=expected.get(key, value).dtype).contiguous()
                            for key, value in state_dict.items()}, strict=True, assign=True)
    left = [name for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()) if tensor.device != device]
    if left:
        raise RuntimeError(f"{type(module).__name__}: {', '.join(left[:8])} not loaded (still on the meta device)")
    return module


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path, kind: str, base_model: str) -> None:
    """:func:`assign_weights` with an error naming the file, the adapter and the mismatch (keys or shapes)."""
    check_fits(module, state_dict, path, kind, base_model)
    assign_weights(module, state_dict)


def check_fits(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path, kind: str, base_model: str) -> None:
    """:class:`AdapterFileError` naming the missing, unexpected or misshapen keys; ``module`` may be on the meta device."""
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


EXPRESSION_ADAPTER_FILE, REFERENCE_LORA_FILE = "expression_adapter", "reference_lora"
E_ADAPTER_FILE, FACECRAFTER_FILE = "e_adapter", "facecrafter"  # our own formats: safetensors only


def safetensors_keys(path) -> list[str]:
    """The tensor names of a .safetensors file, read from its header alone (cheap for large files).

    Raises :class:`WeightFileError` for anything that is not a sane header: the length is checked against
    safetensors' own limit and the file's size before anything is read or allocated."""
    with open(path, "rb") as handle:
        first = handle.read(8)
        problem = not_weights(path, first + handle.read(56))
        if problem:
            raise WeightFileError(path, problem)
        (length,) = struct.unpack("<Q", first) if len(first) == 8 else (0,)
        if not 1 <= length <= min(MAX_SAFETENSORS_HEADER, os.path.getsize(path) - 8):
            raise WeightFileError(path, f"not a safetensors file (its header length reads {length}, "
                                        f"the file has {os.path.getsize(path)} bytes)")
        handle.seek(8)
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise WeightFileError(path, "not a safetensors file (its header is not a JSON object)")
    return [key for key in header if key != "__metadata__"]


_unreadable_logged: set[tuple[str, str]] = set()


def _log_unreadable_once(error: WeightFileError) -> None:
    if (error.path, error.cause) not in _unreadable_logged:
        _unreadable_logged.add((error.path, error.cause))
        logging.warning("Expression Adapters: %s; it is left out of the loaders' lists", error)


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
        except WeightFileError as error:  # not listed in any loader; said once in the log, with the cause
            _log_unreadable_once(error)
            return None
        except OSError:
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
