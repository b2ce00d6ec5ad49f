"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder ``checkpoints/step-000500/`` holding
- ``trainable.safetensors``: the trained weights (for the Expression Adapter stage this is the
  adapter in the published layout, so any checkpoint also loads in the ComfyUI nodes),
- ``optimizer.pt``: the optimizer state (tensors and numbers; read with ``weights_only=True``),
- ``rng-<rank>.pt``: each process's training generator and torch's global generator states,
- ``state.json``: step, micro-batches consumed (the data position), LR scheduler state.
It is written as ``step-000500.partial/`` and renamed when complete, so a crash while saving
leaves the previous checkpoint as the latest one. Older checkpoints beyond ``keep_last`` go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from adapters.checkpoints import read_state_dict, write_safetensors

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(accelerator, output_dir, step: int, trainable: dict, optimizer, lr_scheduler, generator,
                    batches_consumed: int, keep_last: int, extra: dict | None = None) -> Path:
    """Every process writes its RNG state; the main process writes the rest and publishes the folder."""
    final = checkpoint_dir(output_dir, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generator), partial / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_safetensors(trainable, partial / "trainable.safetensors")
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        state = {"step": step, "batches_consumed": batches_consumed, "num_processes": accelerator.num_processes,
                 "lr_scheduler": lr_scheduler.state_dict()} | dict(extra or {})
        (partial / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        if final.exists():  # the same step saved again (a rerun after a crash right after saving)
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder, optimizer, lr_scheduler, generator) -> tuple[dict, dict]:
    """Restore optimizer, scheduler and RNG; returns (trainable state dict, state.json contents)."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{folder} was written by {state['num_processes']} processes; this run has "
                         f"{accelerator.num_processes}. The data position and RNG streams are per process, "
                         "so resume with the same number of processes")
    trainable = read_state_dict(folder / "trainable.safetensors")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = torch.load(folder / f"rng-{accelerator.process_index}.pt", map_location="cpu", weights_only=True)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return trainable, state
