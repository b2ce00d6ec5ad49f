"""One process of multi-process smoke runs, launched by tests/test_training_distributed.py under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_train_worker.py \\
        <record folder> <jobs.json>

Runs the jobs of ``jobs.json`` one after the other in this process, so that the ranks start (torch, diffusers,
transformers, gloo) once for many runs; each job writes ``<record folder>/<job name>/rank-<r>.json``:

- ``{"name": ..., "kind": "train", "arguments": [<config yaml>, section.key=value, ...]}`` trains the config (a
  smoke config) with the overrides and records how accelerate set the run up, the sample keys of each step's
  batches, each step's loss and a digest of the trainable weights after it, and whether this process exported
  the file;
- ``{"name": ..., "kind": "idi", "arguments": [--config ..., --set ...]}`` runs training.idi's own command line
  (its process split comes from torchrun's RANK and WORLD_SIZE) with the test swapper of
  tests/support/training_helpers.py instead of inswapper, and records the rows this process rendered and filtered,
  and the report it printed. The next job starts once every process has recorded its part (a later job may
  train on what IDI wrote).

A failing job ends the process (torchrun then stops the others); the jobs before it have their records.
The test runs the one-process IDI job in its own process with :func:`idi_rows`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from training.config import load_config  # noqa: E402
from training.train import Trainer  # noqa: E402


def weights_digest(module) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(module.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(config_path: str, *overrides: str) -> tuple[int, dict]:
    config = load_config(config_path, list(overrides))
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
    return accelerator.process_index, {
        "rank": accelerator.process_index, "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type), "backend": accelerator.state.backend,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "exported": result.export_path is not None, "steps": steps}


def idi_rows(*argv: str) -> tuple[int, dict]:
    from support.training_helpers import FakeSwapper
    from training import idi

    rows: list[int] = []
    row, build_swapper = idi.IDI.row, idi.build_swapper

    def recording_row(self, index):
        rows.append(index)
        return row(self, index)

    idi.IDI.row = recording_row
    idi.build_swapper = lambda settings: FakeSwapper()
    try:
        result = idi.main(list(argv))
    finally:
        idi.IDI.row, idi.build_swapper = row, build_swapper
    rank = int(os.environ.get("RANK", 0))
    return rank, {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "rows": rows, "result": result}


def wait_for_records(folder: Path, processes: int, timeout: float = 600) -> None:
    """Until every process has written its record in ``folder``."""
    deadline = time.monotonic() + timeout
    while not all((folder / f"rank-{rank}.json").is_file() for rank in range(processes)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other processes did not record {folder.name} in {timeout} s")
        time.sleep(0.05)


def main() -> None:
    record_dir, jobs_file = sys.argv[1:]
    for job in json.loads(Path(jobs_file).read_text()):
        folder = Path(record_dir, job["name"])
        folder.mkdir(parents=True, exist_ok=True)
        rank, record = {"train": train, "idi": idi_rows}[job["kind"]](*job["arguments"])
        (folder / f"rank-{rank}.tmp").write_text(json.dumps(record, indent=1))
        (folder / f"rank-{rank}.tmp").replace(folder / f"rank-{rank}.json")
        if job["kind"] == "idi":
            wait_for_records(folder, int(os.environ.get("WORLD_SIZE", 1)))


if __name__ == "__main__":
    main()
