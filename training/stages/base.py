"""What every training stage is (:class:`Stage`) and what the stages of all three methods share
(:class:`DenoisingStage`: the frozen host on its device, the batch's latents, datasets of shard frames).

A stage owns the trainable module (what accelerate wraps and the optimizer updates), names the
data fields it needs, computes the loss with an explicit random generator (so a resumed run
draws the same noise), and writes the final file in the format the ComfyUI nodes load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..data import ShardDataset


class Stage:
    """Interface of a stage (see the module docstring)."""

    name = "stage"
    required_fields: tuple[str, ...] = ()
    items_with_epoch = False  # whether dataset items are (epoch, index): datasets that draw per epoch
    module: nn.Module
    # parts of the last loss to log beside it (detached scalars), e.g. {"loss_sd": ..., "loss_ad": ...}
    loss_terms: Mapping[str, torch.Tensor] = {}

    def parameter_groups(self, module: nn.Module) -> list:
        """What the optimizer updates: parameters, or groups with their own ``lr`` (train.learning_rate otherwise)."""
        return [p for p in module.parameters() if p.requires_grad]

    def build_dataset(self, records, data_cfg: Mapping):
        raise NotImplementedError

    def loss(self, module: nn.Module, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def export(self, module: nn.Module, path) -> None:
        raise NotImplementedError

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items()}

    def load_trainable_state(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        module.load_state_dict(state, strict=True)


class DenoisingStage(Stage):
    """A stage that trains beside the frozen host (``self.host``: UNet, VAE, noise scheduler) on the denoising
    loss of shard frames. Subclasses set ``self.host`` (:class:`training.models.HostModels`) in ``__init__``."""

    @property
    def device(self) -> torch.device:
        return next(self.host.unet.parameters()).device

    def latents(self, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents of the batch: from cached distributions, or by running the encoder."""
        host = self.host
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(self.device), batch["latent_std"].to(self.device)
            latents = mean + std * torch.randn(mean.shape, generator=generator, device=self.device)
        else:
            pixels = batch["pixels"].to(self.device, next(host.vae.parameters()).dtype)
            with torch.no_grad():
                latents = host.vae.encode(pixels).latent_dist.sample(generator=generator).float()
        return (latents - host.latent_shift) * host.latent_scale

    def build_dataset(self, records, data_cfg: Mapping):
        """One item per frame with the stage's ``required_fields``: cached latents, or the image to encode."""
        cached = bool(data_cfg["use_cached_latents"])
        return ShardDataset(records, self.required_fields, resolution=int(data_cfg["resolution"]),
                            load_image=not cached, load_latents=cached)
