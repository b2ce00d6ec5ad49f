"""LoRA weight files in the published diffusers forms, read into one normalised form.

Accepted key forms for a module ``M`` (optionally prefixed ``unet.``):
``M.lora.down.weight``/``M.lora.up.weight`` (diffusers), ``M.lora_A.weight``/``M.lora_B.weight``
(peft) and ``M.lora_down.weight``/``M.lora_up.weight``; an optional ``M.alpha``. Without alpha the
scale is 1 (alpha = rank), as diffusers trains it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .checkpoints import AdapterFileError, describe_key_mismatch, read_state_dict
from .layers import SD15, UNetLayout, self_attention_layers

_LORA_KEY = re.compile(r"^(?:unet\.)?(?P<module>.+?)\.(?P<part>lora\.down|lora\.up|lora_A|lora_B|lora_down|lora_up)\.weight$")
_ALPHA_KEY = re.compile(r"^(?:unet\.)?(?P<module>.+?)\.alpha$")
_DOWN_PARTS = {"lora.down", "lora_A", "lora_down"}

SELF_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraWeights:
    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change at strength 1: scale x up @ down."""
        return self.scale * (self.up.float() @ self.down.float())


def parse_lora(state_dict: Mapping[str, torch.Tensor], path, kind: str, base_model: str) -> dict[str, LoraWeights]:
    """{diffusers module name: LoraWeights} from any accepted key form."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if match := _LORA_KEY.match(key):
            side = "down" if match["part"] in _DOWN_PARTS else "up"
            parts.setdefault(match["module"], {})[side] = tensor
        elif match := _ALPHA_KEY.match(key):
            alphas[match["module"]] = float(tensor)
        else:
            unknown.append(key)
    if unknown:
        raise AdapterFileError(path, kind, base_model, f"keys that are not LoRA weights: {', '.join(sorted(unknown)[:6])}")
    lora = {}
    for module, sides in parts.items():
        if set(sides) != {"down", "up"}:
            raise AdapterFileError(path, kind, base_model, f"{module} has only its {'/'.join(sides)} matrix")
        down, up = sides["down"], sides["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise AdapterFileError(path, kind, base_model, f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} do not chain")
        lora[module] = LoraWeights(down, up, alphas.get(module))
    return lora


class ReferenceLora:
    """The Reference Adapter's LoRA: every self-attention to_q/to_k/to_v/to_out.0 of the UNet."""

    kind = "Arc2Face Reference Adapter LoRA"
    base_model = "Arc2Face (SD1.5)"
    default_strength = 0.8

    def __init__(self, modules: dict[str, LoraWeights], layout: UNetLayout = SD15):
        self.modules = modules
        self.layout = layout

    @classmethod
    def expected_modules(cls, layout: UNetLayout = SD15) -> list[str]:
        return [f"{layer.diffusers_name}.{target}" for layer in self_attention_layers(layout) for target in SELF_ATTENTION_TARGETS]

    @classmethod
    def from_file(cls, path) -> ReferenceLora:
        return cls.from_state_dict(read_state_dict(path), path)

    @classmethod
    def from_state_dict(cls, state_dict, path="<state dict>") -> ReferenceLora:
        modules = parse_lora(state_dict, path, cls.kind, cls.base_model)
        problem = describe_key_mismatch(cls.expected_modules(), modules)
        if problem:
            raise AdapterFileError(path, cls.kind, cls.base_model, f"{problem} (LoRA modules)")
        return cls(modules)

    @property
    def rank(self) -> int:
        return next(iter(self.modules.values())).rank

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The published key form: ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``."""
        out = {}
        for module, weights in self.modules.items():
            out[f"unet.{module}.lora.down.weight"] = weights.down
            out[f"unet.{module}.lora.up.weight"] = weights.up
            if weights.alpha is not None:
                out[f"unet.{module}.alpha"] = torch.tensor(weights.alpha)
        return out
