"""One tiny UNet in both hosts (diffusers and ComfyUI) with the same weights and fixed inputs."""

from __future__ import annotations

import torch

from hosts.diffusers import attach_adapters
from support.tiny_unets import CONTEXT_DIM, comfy_model, diffusers_unet, sdxl_added_conditions


class Hosts:
    """One tiny UNet in both hosts plus fixed inputs."""

    def __init__(self, family: str, batch: int, seed: int = 0, context_dim: int = CONTEXT_DIM):
        self.family = family
        self.unet = diffusers_unet(family, seed, context_dim)
        self.model = comfy_model(family, self.unet.state_dict())
        generator = torch.Generator().manual_seed(seed + 10)
        self.batch = batch
        self.x = torch.randn(batch, 4, 8, 8, generator=generator)
        self.context = torch.randn(batch, 7, context_dim, generator=generator)
        self.t = torch.full((batch,), 500.0)
        self.added, self.y = sdxl_added_conditions(self.unet, batch) if family == "SDXL" else (None, None)

    def comfy(self, model=None, cond_or_uncond=(0,), sigma=1.0, **transformer_options):
        """The ComfyUI UNet's output, after ComfyUI has loaded ``model`` (applying its weight patches);
        ``transformer_options``: more of what ComfyUI's sampler would pass (a ``context_window``, say)."""
        import comfy.model_management

        model = model or self.model
        comfy.model_management.load_models_gpu([model])
        options = dict(model.model_options["transformer_options"])
        options["cond_or_uncond"] = list(cond_or_uncond)
        options["sigmas"] = torch.full((self.batch,), float(sigma))
        options |= transformer_options
        dtype = model.model.get_dtype()  # a UNet built in fp16/bf16 gets its inputs in it, as ComfyUI's apply_model casts
        y = None if self.y is None else self.y.to(dtype)
        with torch.no_grad():
            return model.model.diffusion_model(self.x.to(dtype), timesteps=self.t, context=self.context.to(dtype), y=y,
                                               transformer_options=options)

    def diffusers(self, adapter=None, tokens=None, scale=1.0, unet=None, **cross_attention_kwargs):
        unet = unet or self.unet
        if adapter is not None:
            attach_adapters(unet, {"expression": adapter})
            cross_attention_kwargs |= {"adapter_tokens": {"expression": tokens}, "adapter_scale": {"expression": scale}}
        with torch.no_grad():
            return unet(self.x, self.t, encoder_hidden_states=self.context, added_cond_kwargs=self.added,
                        cross_attention_kwargs=cross_attention_kwargs or None).sample
