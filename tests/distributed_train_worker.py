"""One process of a multi-process smoke run, launched by tests/test_training_distributed.py under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_train_worker.py \\
        <record folder> <config yaml> [section.key=value ...]

Trains the config (a smoke config) with the overrides and writes ``rank-<r>.json``: how accelerate set the
run up, the sample keys of each step's batches, each step's loss and a digest of the trainable
weights after it, and whether this process exported the file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import load_config  # noqa: E402
from training.train import Trainer  # noqa: E402


def weights_digest(module) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(module.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    record_dir, config_path, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides)
    trainer = Trainer(config)
    accelerator = trainer.accelerator
    batches: list[list[str]] = []
    stage_loss = trainer.stage.loss

    def recording_loss(module, batch, generator, **options):
        batches.append(list(batch["key"]))
        return stage_loss(module, batch, generator, **options)

    trainer.stage.loss = recording_loss
    steps = {}

    def on_step(step: int, loss: float) -> None:
        steps[step] = {"loss": loss, "weights": weights_digest(trainer.unwrapped), "keys": sum(batches, [])}
        batches.clear()

    result = trainer.run(on_step)
    record = {"rank": accelerator.process_index, "num_processes": accelerator.num_processes,
              "distributed_type": str(accelerator.distributed_type), "backend": accelerator.state.backend,
              "resumed_from": str(result.resumed_from) if result.resumed_from else None,
              "exported": result.export_path is not None, "steps": steps}
    Path(record_dir, f"rank-{accelerator.process_index}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
