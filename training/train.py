"""``python -m training.train --config training/configs/<name>.yaml [--set section.key=value ...]``

Runs one stage (see :mod:`training.stages`) on accelerate, so the same command runs on a CPU, one
GPU, or many GPUs and machines with ``accelerate launch -m training.train --config ...``. The base
UNet and the ID encoder are frozen (half precision on GPU with fp16/bf16); only the stage's
module is trained. Checkpoints are resumed exactly (weights, optimizer, LR schedule, RNG, data
position); TensorBoard logs go to ``<output_dir>/logs``, sample grids to ``<output_dir>/samples``,
and the final file (published layout) to ``<output_dir>/<export.file>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, dump_config, load_config
from .data import ResumableBatchSampler, collate
from .demo_data import ensure_demo_data
from .models import load_host_models
from .shards import load_index
from .stages import build_stage

logger = logging.getLogger("training.train")


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss of that step (this run)
    loss_terms: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> the stage's logged terms
    export_path: Path | None = None
    resumed_from: Path | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def attention_context(kind: str):
    """Pick the SDPA kernel (the adapter processors call torch's scaled_dot_product_attention)."""
    if kind == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[kind]
    return sdpa_kernel(backend)


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """Frozen weights in half precision on GPU when training mixed; float32 otherwise."""
    if device.type == "cpu" or mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def count_parameters(stage) -> tuple[int, int]:
    """(trainable, total) over the stage's module and every frozen model it runs, each tensor once."""
    modules = [stage.module, stage.host.unet, getattr(stage.host.id_encoder, "text_model", None), stage.host.vae,
               getattr(stage.module, "adapter", None), *getattr(stage, "frozen_modules", ())]
    seen = {id(p): p for module in modules if module is not None for p in module.parameters()}
    trainable = sum(p.numel() for p in stage.module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


class Trainer:
    """Builds everything from a config; :meth:`run` trains to ``train.max_steps``."""

    def __init__(self, config: Config):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        train = config["train"]
        self.output_dir = Path(config["output_dir"])
        # cpu=True without CUDA (or Apple's MPS): torchrun / accelerate launch then give MULTI_CPU (gloo) with
        # gradients averaged across processes; without it accelerate falls back to independent single-process runs.
        self.accelerator = Accelerator(
            cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
            mixed_precision=train["mixed_precision"],
            gradient_accumulation_steps=int(train["gradient_accumulation_steps"]),
            project_config=ProjectConfiguration(project_dir=str(self.output_dir)),
        )
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(config, self.output_dir / "config.yaml")
        accelerator.wait_for_everyone()
        device = accelerator.device
        if device.type == "cpu" and train["cpu_threads"]:
            torch.set_num_threads(int(train["cpu_threads"]))
        if device.type == "cuda" and train["allow_tf32"]:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(int(config["seed"]))

        data_cfg = config["data"]
        if accelerator.is_main_process:
            ensure_demo_data(config)
        accelerator.wait_for_everyone()
        records = load_index(data_cfg["shards"])
        cached = bool(data_cfg["use_cached_latents"])
        self.host = load_host_models(config, device, weight_dtype(train["mixed_precision"], device), need_vae=not cached)
        self.stage = build_stage(config, self.host, device)
        if train["gradient_checkpointing"]:
            self.host.unet.enable_gradient_checkpointing()
            self.host.unet.train()  # diffusers checkpoints only in training mode; the UNet has no dropout
        self.dataset = self.stage.build_dataset(records, data_cfg)
        self.trainable_parameters, self.total_parameters = count_parameters(self.stage)
        if self.trainable_parameters == 0:
            raise ValueError(f"stage {config['stage']} has no trainable parameters")

        params = self.stage.parameter_groups(self.stage.module)
        self.optimizer = torch.optim.AdamW(params, lr=float(train["learning_rate"]), weight_decay=float(train["weight_decay"]),
                                           betas=(float(train["adam_beta1"]), float(train["adam_beta2"])),
                                           eps=float(train["adam_epsilon"]))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train["lr_scheduler"], int(train["lr_warmup_steps"]), int(train["max_steps"])))
        # The LR scheduler stays unwrapped: accelerate would step it once per process per step.
        self.module, self.optimizer = accelerator.prepare(self.stage.module, self.optimizer)
        # Each process draws its own noise; the generator's state is checkpointed.
        self.generator = torch.Generator(device=device).manual_seed(int(config["seed"]) * 1000 + accelerator.process_index)
        self.step = 0
        self.batches_consumed = 0
        self.resumed_from = None
        self._resume()

    def _resume(self) -> None:
        resume = self.config["checkpointing"]["resume"]
        if resume in (None, "none"):
            return
        folder = latest_checkpoint(self.output_dir) if resume == "latest" else Path(resume)
        if folder is None:
            return
        trainable, state = load_checkpoint(self.accelerator, folder, self.optimizer, self.lr_scheduler, self.generator)
        self.stage.load_trainable_state(self.unwrapped, trainable)
        self.step, self.batches_consumed = int(state["step"]), int(state["batches_consumed"])
        self.resumed_from = folder
        logger.info("resumed from %s at step %d", folder, self.step)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.module)

    def data_loader(self):
        data_cfg, train = self.config["data"], self.config["train"]
        sampler = ResumableBatchSampler(self.dataset, int(train["batch_size"]), int(self.config["seed"]),
                                        int(data_cfg["shuffle_shards"]), self.accelerator.num_processes,
                                        self.accelerator.process_index, start=self.batches_consumed,
                                        with_epoch=self.stage.items_with_epoch)
        workers = int(data_cfg["num_workers"])
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                           pin_memory=self.accelerator.device.type == "cuda",
                                           persistent_workers=workers > 0)

    def save(self) -> Path:
        ckpt = self.config["checkpointing"]
        return save_checkpoint(self.accelerator, self.output_dir, self.step, self.stage.trainable_state(self.unwrapped),
                               self.optimizer, self.lr_scheduler, self.generator, self.batches_consumed,
                               int(ckpt["keep_last"]), {"stage": self.config["stage"]})

    def sample(self, batch: Mapping, writer) -> None:
        from .sampling import sample_grid, save_png

        cfg = self.config["sampling"]
        count = min(int(cfg["num_samples"]), len(batch["key"]))
        small = {k: (v[:count] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        module = self.unwrapped
        module.eval()
        image = sample_grid(self.stage, module, small, cfg, int(cfg["seed"]))
        module.train()
        folder = self.output_dir / "samples"
        folder.mkdir(exist_ok=True)
        save_png(image, folder / f"step-{self.step:07d}.png")
        if writer is not None:
            writer.add_image("samples", image, self.step, dataformats="HWC")

    def run(self, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
        from tqdm import tqdm

        accelerator, config = self.accelerator, self.config
        train, ckpt, log_cfg, sampling = config["train"], config["checkpointing"], config["logging"], config["sampling"]
        max_steps, accumulation = int(train["max_steps"]), int(train["gradient_accumulation_steps"])
        writer = None
        if accelerator.is_main_process and log_cfg["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.output_dir / "logs"))
        result = TrainResult(self.step, resumed_from=self.resumed_from, trainable_parameters=self.trainable_parameters,
                             total_parameters=self.total_parameters)
        bar = tqdm(total=max_steps, initial=self.step, desc=config["stage"], unit="step",
                   disable=not (accelerator.is_main_process and log_cfg["progress_bar"]))
        loader = iter(self.data_loader())
        sample_batch = None
        self.module.train()
        try:
            while self.step < max_steps:
                losses, terms = [], []
                for _ in range(accumulation):
                    batch = next(loader)
                    self.batches_consumed += 1
                    sample_batch = sample_batch or batch
                    with accelerator.accumulate(self.module), attention_context(train["attention"]):
                        loss = self.stage.loss(self.module, batch, self.generator)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and float(train["max_grad_norm"]) > 0:
                            accelerator.clip_grad_norm_(self.module.parameters(), float(train["max_grad_norm"]))
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.detach())
                    terms.append(self.stage.loss_terms)
                self.lr_scheduler.step()
                self.step += 1
                step_loss = float(accelerator.gather(torch.stack(losses).mean()[None]).mean())
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"the loss is {step_loss} at step {self.step}; the last checkpoint is intact")
                result.losses[self.step] = step_loss
                result.loss_terms[self.step] = {name: float(accelerator.gather(torch.stack([t[name] for t in terms]).mean()[None]).mean())
                                                for name in terms[0]}
                bar.update(1)
                if accelerator.is_main_process:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                    if writer is not None and self.step % int(log_cfg["every_steps"]) == 0:
                        writer.add_scalar("train/loss", step_loss, self.step)
                        writer.add_scalar("train/lr", self.lr_scheduler.get_last_lr()[0], self.step)
                        for name, value in result.loss_terms[self.step].items():
                            writer.add_scalar(f"train/{name}", value, self.step)
                if int(ckpt["every_steps"]) and self.step % int(ckpt["every_steps"]) == 0 and self.step < max_steps:
                    self.save()
                if int(sampling["every_steps"]) and self.step % int(sampling["every_steps"]) == 0 and accelerator.is_main_process:
                    self.sample(sample_batch, writer)
                if on_step is not None:
                    on_step(self.step, step_loss)
            self.save()
            if accelerator.is_main_process:
                result.export_path = self.output_dir / config["export"]["file"]
                self.stage.export(self.unwrapped, result.export_path)
                (self.output_dir / "parameters.json").write_text(json.dumps(
                    {"trainable": self.trainable_parameters, "total": self.total_parameters}), encoding="utf-8")
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        accelerator.wait_for_everyone()
        result.step = self.step
        return result


def train(config: Config, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    return Trainer(config).run(on_step)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file such as training/configs/expression_adapter.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.max_steps=1000")
    return parser.parse_args(argv)


def main(argv=None) -> TrainResult:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides)
    result = train(config)
    if result.export_path is not None:
        print(f"trained {result.step} steps; trainable parameters {result.trainable_parameters:,} of "
              f"{result.total_parameters:,}; exported {result.export_path}")
    return result


if __name__ == "__main__":
    main()
