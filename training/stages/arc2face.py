"""The Expression Adapter's two training stages on the frozen Arc2Face UNet (paper §3.4): the adapter
(``expression_adapter``), then the Reference Adapter's LoRA with the adapter frozen (``reference_lora``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from adapters.branches import TokenCondition
from adapters.expression_adapter import ExpressionAdapter
from adapters.rows import COND, UNCOND
from hosts.diffusers import ReferenceBank, attach_adapters

from ..data import PairDataset
from ..models import HostModels, build_expression_adapter, unet_layout
from ..sampling import SamplingInputs
from .base import DenoisingStage


class AdapterDenoiser(nn.Module):
    """The frozen UNet with the Expression Adapter's branches; only the adapter is a submodule.

    Keeping the UNet out of the module tree keeps it out of the optimizer, DDP's gradient
    buckets and the checkpoint, while its attention processors still call the adapter's branches.
    The training forward passes the tokens one per batch row (``adapter_tokens``): with per-sample
    condition dropout each row has its own, which is a per-row layout, not chunks of a guided batch
    (sampling goes through :class:`~adapters.branches.TokenCondition` and a ``RowLayout``).
    """

    def __init__(self, unet, adapter: ExpressionAdapter):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", unet)
        attach_adapters(unet, {"expression": adapter})

    def forward(self, noisy, timesteps, context, expression, scale: float = 1.0):
        tokens = self.adapter.expression_tokens(expression)
        return self.unet(noisy, timesteps, encoder_hidden_states=context,
                         cross_attention_kwargs={"adapter_tokens": {"expression": tokens},
                                                 "adapter_scale": {"expression": scale}}).sample


class ExpressionAdapterStage(DenoisingStage):
    """Stage 1 (paper §3.4): the Expression Adapter on the frozen Arc2Face UNet, denoising loss.

    Condition dropout, per sample: the expression alone (zero 55-vector: its projected tokens are
    what "no expression" means at inference), the ID alone (the encoder on "", Arc2Face's
    negative), or both, so classifier-free guidance works with either condition.
    """

    name = "expression_adapter"
    required_fields = ("id", "flame")

    def __init__(self, config: Mapping, host: HostModels, device):
        self.config = config
        self.host = host
        self.train_cfg = config["train"]
        adapter = build_expression_adapter(host.unet, config["adapter"]).to(device)
        self.module = AdapterDenoiser(host.unet, adapter)
        self.negative = None

    def conditions(self, batch: Mapping, generator: torch.Generator, dropout: bool = True):
        """ID conditioning (B x 77 x D), expressions (B x 55), with condition dropout applied, and
        the rows where both were dropped (fully unconditional rows)."""
        ids = batch["id"].to(self.device)
        expression = batch["flame"].to(self.device).float()
        context = self.host.id_encoder.encode(ids)
        if self.negative is None:
            self.negative = self.host.id_encoder.encode_negative(1)
        unconditional = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        if dropout:
            cfg = self.train_cfg
            u = torch.rand(ids.shape[0], generator=generator, device=self.device)
            p_exp, p_id, p_both = float(cfg["drop_expression"]), float(cfg["drop_id"]), float(cfg["drop_both"])
            drop_exp = (u < p_exp) | ((u >= p_exp + p_id) & (u < p_exp + p_id + p_both))
            drop_id = (u >= p_exp) & (u < p_exp + p_id + p_both)
            expression = torch.where(drop_exp[:, None], torch.zeros_like(expression), expression)
            context = torch.where(drop_id[:, None, None], self.negative.to(context), context)
            unconditional = drop_exp & drop_id
        return context, expression, unconditional

    def loss(self, module, batch, generator, dropout: bool = True) -> torch.Tensor:
        scheduler = self.host.noise_scheduler
        latents = self.latents(batch, generator)
        batch_size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        offset = float(self.train_cfg["noise_offset"])
        if offset:
            noise = noise + offset * torch.randn((batch_size, latents.shape[1], 1, 1), generator=generator, device=self.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                                  device=self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context, expression, unconditional = self.conditions(batch, generator, dropout)
        unet_dtype = next(self.host.unet.parameters()).dtype
        prediction = self.predict(module, batch, generator, noisy.to(unet_dtype), timesteps, context.to(unet_dtype),
                                  expression, unconditional)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    def predict(self, module, batch, generator, noisy, timesteps, context, expression, unconditional):
        return module(noisy, timesteps, context, expression)

    def adapter(self, module) -> ExpressionAdapter:
        return module.adapter

    def export(self, module, path) -> None:
        self.adapter(module).save(path)

    def sampling_inputs(self, module, batch: Mapping) -> SamplingInputs:
        """CFG's two predictions for sample grids: the ID context with the batch's expressions, and Arc2Face's
        negative with the adapter's unconditional tokens (the zero expression), as Apply Expression Adapter has it."""
        context, expression, _ = self.conditions(batch, None, dropout=False)
        adapter = self.adapter(module)
        with torch.no_grad():
            tokens = adapter.expression_tokens(expression)
            condition = TokenCondition(adapter, tokens, adapter.unconditional_tokens().to(tokens))
        negative = self.negative.to(context).expand_as(context)
        return SamplingInputs({UNCOND: negative, COND: context}, {"expression": condition})


class ReferenceDenoiser(nn.Module):
    """The frozen UNet with peft LoRA on its self-attention and the frozen Expression Adapter.

    Only the LoRA matrices are submodules (registered a second time here, under names derived
    from their UNet module), so they alone are trained, synchronised and checkpointed. Forward:
    the Reference UNet pass (the same UNet with the LoRA switched off and no adapter tokens, at
    timestep 0 on the clean reference latents, recording each block's self-attention input), then
    the denoising pass whose reading rows attend over their own and the recorded tokens.
    """

    def __init__(self, unet, adapter: ExpressionAdapter, lora_layers: Mapping[str, nn.Module]):
        super().__init__()
        self.lora = nn.ModuleDict()
        self.module_names = {}
        for name, layer in lora_layers.items():
            key = name.replace(".", "__")
            self.lora[key] = nn.ModuleDict({"down": layer.lora_A["default"], "up": layer.lora_B["default"]})
            self.module_names[key] = name
        object.__setattr__(self, "unet", unet)
        object.__setattr__(self, "adapter", adapter)

    def forward(self, noisy, timesteps, context, expression, reference_latents, read_rows):
        """``read_rows``: a bool per batch row; rows dropped to fully unconditional read no reference. Like
        :class:`AdapterDenoiser`, a per-row training layout (tokens one per row), not a guided batch."""
        with torch.no_grad():
            tokens = self.adapter.expression_tokens(expression)
        kwargs = {"adapter_tokens": {"expression": tokens}}
        if bool(read_rows.any()):
            kwargs["reference"] = capture_reference(self.unet, reference_latents[read_rows], context[read_rows]).reading(read_rows)
        return self.unet(noisy, timesteps, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample


@torch.no_grad()
def capture_reference(unet, latents, context) -> ReferenceBank:
    """The Reference UNet pass: the base UNet (LoRA off, no adapter tokens) at timestep 0 on clean latents."""
    bank = ReferenceBank()
    unet.disable_adapters()
    try:
        zero = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        unet(latents, zero, encoder_hidden_states=context, cross_attention_kwargs={"reference": bank.writing()})
    finally:
        unet.enable_adapters()
    return bank


class ReferenceLoraStage(ExpressionAdapterStage):
    """Stage 2 (paper §3.4): the Reference Adapter's rank-128 LoRA on every self-attention to_q,
    to_k, to_v and to_out.0, with the trained Expression Adapter frozen, on cross-paired frames
    of one clip (the reference gives the identity and the reference features, the target the
    expression and the denoising target). Rows whose conditions are both dropped are trained as
    the unconditional rows of inference: no reference, the "" ID, the zero expression.
    """

    name = "reference_lora"
    required_fields = ("id", "flame")
    items_with_epoch = True

    def __init__(self, config: Mapping, host: HostModels, device):
        from peft import LoraConfig

        from adapters.lora import ReferenceLora

        self.config = config
        self.host = host
        self.train_cfg = config["train"]
        self.negative = None
        lora_cfg = config["reference_lora"]
        layout = unet_layout(host.unet)
        adapter = ExpressionAdapter.from_file(lora_cfg["expression_adapter"], layout).to(device).requires_grad_(False)
        attach_adapters(host.unet, {"expression": adapter})
        self.rank = int(lora_cfg["rank"])
        self.alpha = float(lora_cfg["alpha"] or self.rank)
        names = ReferenceLora.expected_modules(layout)
        host.unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=names))
        for name, parameter in host.unet.named_parameters():
            # LoRA matrices train in float32 even when the frozen UNet is half precision
            if "lora_" in name:
                parameter.data = parameter.data.float()
        self.module = ReferenceDenoiser(host.unet, adapter, {name: host.unet.get_submodule(name) for name in names})

    def build_dataset(self, records, data_cfg: Mapping):
        frames = super().build_dataset(records, data_cfg)
        return PairDataset(frames, float(self.config["reference_lora"]["pair_window_seconds"]), int(self.config["seed"]))

    def reference_latents(self, batch: Mapping, generator) -> torch.Tensor:
        renamed = {k.removeprefix("reference_"): v for k, v in batch.items() if k.startswith("reference_") and k != "reference_key"}
        return self.latents(renamed, generator)

    def predict(self, module, batch, generator, noisy, timesteps, context, expression, unconditional):
        reference = self.reference_latents(batch, generator).to(noisy.dtype)
        return module(noisy, timesteps, context, expression, reference, ~unconditional)

    def lora(self, module):
        from adapters.lora import LoraWeights, ReferenceLora

        alpha = None if self.alpha == self.rank else self.alpha
        return ReferenceLora({module.module_names[key]: LoraWeights(pair["down"].weight.detach().float().cpu(),
                                                                    pair["up"].weight.detach().float().cpu(), alpha)
                              for key, pair in module.lora.items()}, unet_layout(self.host.unet))

    def export(self, module, path) -> None:
        from adapters.checkpoints import write_safetensors

        write_safetensors(self.lora(module).state_dict(), path, metadata={"kind": "Arc2Face Reference Adapter LoRA"})

    def sampling_inputs(self, module, batch: Mapping) -> SamplingInputs:
        """The Expression Adapter's CFG predictions, with the reference (its Reference UNet pass on the ID
        context) read by the conditional rows of the batch's layout, as in ComfyUI."""
        inputs = super().sampling_inputs(module, batch)
        reference = self.reference_latents(batch, None).to(next(self.host.unet.parameters()).dtype)
        inputs.reference = capture_reference(self.host.unet, reference, inputs.contexts[COND].to(reference.dtype))
        return inputs
