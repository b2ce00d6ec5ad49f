"""Helper models (SMIRK, EmoNet, the Arc2Face ID encoder) under ComfyUI's memory management.

As ComfyUI's own CLIP vision loader does: each module sits in a ``ModelPatcher`` with a load
device and an offload device, and every use goes through ``comfy.model_management.load_models_gpu``,
so ComfyUI counts its memory, makes room for it and offloads it when something else needs the GPU.
"""

from __future__ import annotations

import torch
from comfy import model_management
from comfy.model_patcher import ModelPatcher


class HelperModel:
    """What a helper-model socket carries: the module in a ModelPatcher; :meth:`loaded` before each use."""

    def __init__(self, module: torch.nn.Module, name: str, load_device=None, offload_device=None):
        # the devices ComfyUI gives image encoders (CLIP vision): the GPU when it is worth it, the CPU between uses
        load_device = model_management.text_encoder_device() if load_device is None else load_device
        offload_device = model_management.text_encoder_offload_device() if offload_device is None else offload_device
        self.name = name
        self.patcher = ModelPatcher(module.to(offload_device), load_device=load_device, offload_device=offload_device)

    @property
    def model(self) -> torch.nn.Module:
        return self.patcher.model

    def loaded(self) -> torch.nn.Module:
        """The module on its load device, loaded (and counted) by ComfyUI's model management."""
        model_management.load_models_gpu([self.patcher])
        return self.patcher.model

    def __repr__(self) -> str:
        return f"{self.name}(load={self.patcher.load_device}, offload={self.patcher.offload_device})"


def helper_module(value) -> torch.nn.Module:
    """The loaded module of a helper-model socket value (a :class:`HelperModel`, or a bare module as before)."""
    return value.loaded() if isinstance(value, HelperModel) else value


def helper_of(module: torch.nn.Module, name: str) -> HelperModel:
    """The :class:`HelperModel` of a module that travels inside another socket value (FaceCrafter's control
    modules), made once and kept on the module."""
    helper = getattr(module, "_comfy_helper", None)
    if helper is None:
        helper = module._comfy_helper = HelperModel(module, name)
    return helper
