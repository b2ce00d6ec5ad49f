"""Sample grids during training: a plain denoising loop (no pipeline class) with classifier-free guidance
(FaceCrafter's stages: its multi-condition guidance, Eq. 6).

The loop is the same one a diffusers pipeline runs (DPM-Solver++ from the training schedule,
CFG over a [uncond, cond] batch) written out, so it works with our attention processors and a
tiny random UNet alike. Latents are decoded with the VAE when there is one; otherwise their first
three channels are shown, normalised, which is enough to see training move.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


@torch.no_grad()
def denoise(unet, noise_scheduler_config, cond, uncond, latent_shape, steps: int = 25, guidance: float = 3.0,
            generator: torch.Generator | None = None, extra: Mapping | None = None, guide=None) -> torch.Tensor:
    """Latents from noise. ``cond``/``uncond``: (context B x 77 x D, {adapter name: tokens B x T x D});
    ``extra``: more attention keyword arguments for the [uncond, cond] batch (the reference bank), and under
    ``added_cond_kwargs`` SDXL's pooled text and time ids for that batch.

    ``guide``: for more than one conditional prediction (FaceCrafter's Eq. 6), ``cond`` stacks k chunks of B rows
    and ``guide(uncond, *conditional)`` combines the k + 1 predictions; None is CFG with ``guidance``."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler_config, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(steps)
    parameter = next(unet.parameters())
    latents = torch.randn(latent_shape, generator=generator, device=generator.device if generator else "cpu")
    latents = latents.to(parameter.device) * scheduler.init_noise_sigma
    context = torch.cat([uncond[0], cond[0]]).to(parameter.dtype)
    tokens = {name: torch.cat([uncond[1][name], cond[1][name]]).to(parameter.dtype) for name in cond[1]}
    extra = dict(extra or {})
    added = extra.pop("added_cond_kwargs", None)
    chunks = context.shape[0] // latent_shape[0]
    if guide is None:
        def guide(unconditional, conditional):
            return unconditional + guidance * (conditional - unconditional)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * chunks), t)
        prediction = unet(model_input.to(parameter.dtype), t, encoder_hidden_states=context,
                          cross_attention_kwargs={"adapter_tokens": tokens, **extra}, added_cond_kwargs=added).sample.float()
        latents = scheduler.step(guide(*prediction.chunk(chunks)), t, latents).prev_sample
    return latents


@torch.no_grad()
def to_pixels(latents: torch.Tensor, vae=None, scale: float = 0.18215, shift: float = 0.0) -> torch.Tensor:
    """B x 3 x H x W in 0..1: decoded by the VAE, or the first three latent channels, normalised and enlarged 8x."""
    if vae is not None:
        parameter = next(vae.parameters())
        images = vae.decode((latents / scale + shift).to(parameter.dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)
    shown = latents[:, :3].float()
    low = shown.amin(dim=(1, 2, 3), keepdim=True)
    high = shown.amax(dim=(1, 2, 3), keepdim=True)
    shown = (shown - low) / (high - low).clamp(min=1e-6)
    return torch.nn.functional.interpolate(shown, scale_factor=8, mode="nearest")


def grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of B x 3 x H x W images (0..1, equal sizes) -> one H' x W' x 3 uint8 picture, 2-pixel gaps."""
    gap = 2
    rows = [torch.nn.functional.interpolate(r.float().cpu(), size=rows[0].shape[-2:], mode="bilinear") for r in rows]
    count, _, height, width = rows[0].shape
    canvas = np.full((len(rows) * (height + gap) - gap, count * (width + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(count):
            image = (row[j].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            canvas[i * (height + gap):i * (height + gap) + height, j * (width + gap):j * (width + gap) + width] = image
    return canvas


def sample_grid(stage, module, batch: Mapping, sampling_cfg: Mapping, seed: int) -> np.ndarray:
    """Top row: the training crops whose ID and expression condition the bottom row's samples."""
    host = stage.host
    cond, uncond, extra = stage.sampling_inputs(module, batch)
    count = uncond[0].shape[0]
    guide = stage.sampling_guide() if hasattr(stage, "sampling_guide") else None  # FaceCrafter: Eq. 6
    channels = host.unet.config.in_channels
    size = host.unet.config.sample_size
    if "pixels" in batch:
        size = batch["pixels"].shape[-1] // 8
    elif "latent_mean" in batch:
        size = batch["latent_mean"].shape[-1]
    generator = torch.Generator(device=stage.device).manual_seed(seed)
    latents = denoise(host.unet, host.noise_scheduler.config, cond, uncond, (count, channels, size, size),
                      int(sampling_cfg["num_inference_steps"]), float(sampling_cfg["guidance_scale"]), generator, extra,
                      guide)
    samples = to_pixels(latents, host.vae, host.latent_scale, host.latent_shift)
    rows = []
    if "pixels" in batch:
        rows.append(((batch["pixels"].float() + 1) / 2).clamp(0, 1))
    elif "latent_mean" in batch:
        # cached latents: show the targets as the VAE sees them (their latents, decoded)
        targets = (batch["latent_mean"].to(stage.device) - host.latent_shift) * host.latent_scale
        rows.append(to_pixels(targets, host.vae, host.latent_scale, host.latent_shift).cpu())
    rows.append(samples.cpu())
    return grid(rows)


def save_png(image: np.ndarray, path) -> None:
    import cv2

    if not cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1])):
        raise OSError(f"could not write {path}")
