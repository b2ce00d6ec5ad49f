"""Sample grids during training: a plain denoising loop (no pipeline class) with classifier-free guidance
(FaceCrafter's stages: its multi-condition guidance, Eq. 6).

The loop is the same one a diffusers pipeline runs (DPM-Solver++ from the training schedule, one batched
UNet call per step over the guide's predictions) written out, so it works with our attention processors and
a tiny random UNet alike. A stage describes the batch prediction by prediction (:class:`SamplingInputs`: a
context per prediction index, the adapters' branch conditions from ``adapters.branches``); :func:`denoise`
lays the rows out with the batch's :class:`~adapters.rows.RowLayout` and hands the processor the conditions
and that layout, as the ComfyUI host gets them, so no sampling path stacks [uncond, cond] rows by hand.
Latents are decoded with the VAE when there is one; otherwise their first three channels are shown,
normalised, which is enough to see training move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from adapters.rows import COND, UNCOND, RowLayout


@dataclass
class SamplingInputs:
    """A guided sampling batch, prediction by prediction (what a stage's ``sampling_inputs`` returns).

    - ``contexts``: {prediction index: context, B x 77 x D}, one per index of ``chunks``;
    - ``conditions``: {adapter name (as attached to the UNet): branch condition} (``adapters.branches``:
      a ``TokenCondition``, FaceCrafter's ``SwitchedCondition``); they lay out their own rows from the layout;
    - ``chunks``: the prediction indices in batch order, which is the order ``guide`` takes the predictions in;
    - ``conditional``: {prediction index: conditional} where index ``COND`` alone is not the conditional one
      (FaceCrafter's ``GUIDANCE_CONDITIONAL``), as ``RowLayout`` takes it;
    - ``options``: the processor's ``adapter_options`` (FaceCrafter's switches, as its Guider sends them);
    - ``added``: {prediction index: SDXL's ``added_cond_kwargs`` for that chunk's B rows};
    - ``reference``: a ``ReferenceBank`` written by the Reference UNet pass, read by the conditional rows;
    - ``guide``: the predictions (B rows each, in ``chunks`` order) -> the guided one; None: CFG.
    """

    contexts: Mapping[int, torch.Tensor]
    conditions: Mapping[str, object] = field(default_factory=dict)
    chunks: Sequence[int] = (UNCOND, COND)
    conditional: Mapping[int, bool] | None = None
    options: Mapping | None = None
    added: Mapping[int, Mapping[str, torch.Tensor]] | None = None
    reference: object | None = None
    guide: Callable[..., torch.Tensor] | None = None

    @property
    def count(self) -> int:
        """Images in the batch: the rows of one chunk."""
        return self.contexts[self.chunks[0]].shape[0]

    def layout(self) -> RowLayout:
        return RowLayout(len(self.chunks) * self.count, self.chunks, conditional=self.conditional)


def cfg_guide(chunks: Sequence[int], guidance: float) -> Callable[..., torch.Tensor]:
    """Classifier-free guidance over the predictions of ``chunks`` (``UNCOND`` and ``COND``, in either order)."""
    uncond_at, cond_at = list(chunks).index(UNCOND), list(chunks).index(COND)

    def guide(*predictions):
        unconditional, conditional = predictions[uncond_at], predictions[cond_at]
        return unconditional + guidance * (conditional - unconditional)

    return guide


@torch.no_grad()
def denoise(unet, noise_scheduler_config, inputs: SamplingInputs, latent_shape, steps: int = 25, guidance: float = 3.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents (``latent_shape``, B images) from noise, guided over the predictions ``inputs`` describes.

    The batch is the layout's chunks of B rows each: their contexts (and SDXL's added conditions) stacked by
    the layout, the adapters' conditions and the layout itself in ``cross_attention_kwargs``, the reference
    read by the conditional chunks. ``inputs.guide`` combines the predictions; None is CFG with ``guidance``."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler_config, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(steps)
    parameter = next(unet.parameters())
    latents = torch.randn(latent_shape, generator=generator, device=generator.device if generator else "cpu")
    latents = latents.to(parameter.device) * scheduler.init_noise_sigma
    if inputs.count != latent_shape[0]:
        raise ValueError(f"the sampling inputs are for {inputs.count} images but the latents for {latent_shape[0]}")
    layout = inputs.layout()
    context = layout.stack(lambda index: inputs.contexts[index]).to(parameter.dtype)
    added = None
    if inputs.added is not None:
        added = {key: layout.stack(lambda index, key=key: inputs.added[index][key]) for key in inputs.added[layout.chunks[0]]}
    kwargs = {"adapter_conditions": dict(inputs.conditions), "rows": layout}
    if inputs.options is not None:
        kwargs["adapter_options"] = inputs.options
    if inputs.reference is not None:
        kwargs["reference"] = inputs.reference.reading(layout)
    guide = inputs.guide or cfg_guide(layout.chunks, guidance)
    chunks = len(layout.chunks)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * chunks), t)
        prediction = unet(model_input.to(parameter.dtype), t, encoder_hidden_states=context,
                          cross_attention_kwargs=kwargs, added_cond_kwargs=added).sample.float()
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
    inputs = stage.sampling_inputs(module, batch)
    channels = host.unet.config.in_channels
    size = host.unet.config.sample_size
    if "pixels" in batch:
        size = batch["pixels"].shape[-1] // 8
    elif "latent_mean" in batch:
        size = batch["latent_mean"].shape[-1]
    generator = torch.Generator(device=stage.device).manual_seed(seed)
    latents = denoise(host.unet, host.noise_scheduler.config, inputs, (inputs.count, channels, size, size),
                      int(sampling_cfg["num_inference_steps"]), float(sampling_cfg["guidance_scale"]), generator)
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
