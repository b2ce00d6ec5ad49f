"""An IP-Adapter-shaped module: a projection to tokens plus key/value branches per layer.

State-dict convention (as published): ``image_proj.*`` for the projection and
``ip_adapter.<checkpoint number>.to_k_ip.weight`` / ``.to_v_ip.weight`` per cross-attention layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .attention import KeyValueBranch
from .checkpoints import (
    AdapterFileError,
    load_strict,
    read_state_dict,
    split_prefix,
    without_init,
    write_safetensors,
)
from .layers import LAYOUTS, SD15, SDXL, AttentionLayer, UNetLayout, cross_attention_layers
from .projections import projection_from_state_dict

_BRANCH_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")


class CrossAttentionAdapter(nn.Module):
    kind = "cross-attention adapter"
    base_model = "SD1.5 or SDXL"

    def __init__(self, projection: nn.Module, layout: UNetLayout, widths: Mapping[int, int]):
        super().__init__()
        self.layout = layout
        self.image_proj = projection
        token_dim = projection.token_dim
        self.ip_adapter = nn.ModuleDict({str(n): KeyValueBranch(token_dim, widths[n]) for n in sorted(widths)})
        by_number = {layer.checkpoint_number: layer for layer in cross_attention_layers(layout)}
        self.layers: tuple[AttentionLayer, ...] = tuple(by_number[n] for n in sorted(widths))

    @property
    def token_dim(self) -> int:
        return self.image_proj.token_dim

    @property
    def num_tokens(self) -> int:
        return self.image_proj.num_tokens

    def branch(self, layer: AttentionLayer) -> KeyValueBranch:
        return self.ip_adapter[str(layer.checkpoint_number)]

    def project(self, condition: torch.Tensor) -> torch.Tensor:
        """(batch, in_dim) condition vectors -> (batch, tokens, token_dim) adapter tokens."""
        parameter = next(self.image_proj.parameters())
        return self.image_proj(condition.to(device=parameter.device, dtype=parameter.dtype))

    # -- files -------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path, layout: UNetLayout | None = None):
        return cls.from_state_dict(read_state_dict(path), path, layout)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], path="<state dict>", layout: UNetLayout | None = None):
        """Built without random init, holding ``state_dict``'s tensors as float32 (those already so not copied)."""
        image_proj = split_prefix(state_dict, "image_proj")
        ip_adapter = split_prefix(state_dict, "ip_adapter")
        if not image_proj or not ip_adapter:
            found = sorted({key.split(".")[0] for key in state_dict})
            raise AdapterFileError(path, cls.kind, cls.base_model, f"expected 'image_proj' and 'ip_adapter' sections, found {found}")
        try:
            with without_init():  # every weight comes from the file
                projection = projection_from_state_dict(image_proj)
        except KeyError as error:
            raise AdapterFileError(path, cls.kind, cls.base_model, f"unrecognised image_proj: {error.args[0]}") from None
        widths = {}
        for key, tensor in ip_adapter.items():
            match = _BRANCH_KEY.match(key)
            if match and match.group(2) == "k":
                widths[int(match.group(1))] = tensor.shape[0]
        layout = layout or cls._detect_layout(widths, projection.token_dim, path)
        known = {layer.checkpoint_number for layer in cross_attention_layers(layout)}
        if not widths or not set(widths) <= known:
            raise AdapterFileError(path, cls.kind, cls.base_model, f"layer numbers {sorted(widths)[:8]}... are not {layout.name} cross-attention layers")
        with without_init():
            adapter = cls(projection, layout, widths)
        adapter._check(path)
        load_strict(adapter, {f"image_proj.{k}": v for k, v in image_proj.items()} | {f"ip_adapter.{k}": v for k, v in ip_adapter.items()},
                    path, cls.kind, cls.base_model)
        return adapter

    @classmethod
    def _detect_layout(cls, widths: Mapping[int, int], token_dim: int, path) -> UNetLayout:
        numbers = set(widths)
        for layout in LAYOUTS.values():
            if numbers == {layer.checkpoint_number for layer in cross_attention_layers(layout)}:
                return layout
        if numbers and max(numbers) > max(layer.checkpoint_number for layer in cross_attention_layers(SD15)):
            return SDXL
        if token_dim in (SD15.context_dim, SDXL.context_dim):
            return SD15 if token_dim == SD15.context_dim else SDXL
        raise AdapterFileError(path, cls.kind, cls.base_model, f"cannot tell SD1.5 from SDXL from layers {sorted(numbers)}")

    def _check(self, path) -> None:
        """Subclasses reject files of the right shape family but the wrong kind."""

    def save(self, path) -> None:
        """Save in the published layout (``image_proj.*``, ``ip_adapter.N.to_k_ip.weight``) as safetensors."""
        write_safetensors(self.state_dict(), path, metadata={"kind": self.kind, "layout": self.layout.name})
