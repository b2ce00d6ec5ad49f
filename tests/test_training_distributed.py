"""Multi-process training on this CPU machine, as users scale out on GPUs: torchrun with 2 processes (gloo).

Each process records its batches, losses and a digest of its trainable weights after every step
(tests/distributed_train_worker.py). The ranks must read different samples, hold identical weights
after each step (gradients averaged: with different data they would otherwise part), export once,
and a run resumed from a 2-process checkpoint must continue exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import load_config
from training.demo_data import build_demo_data

pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = "training/configs/smoke.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo_data(out, load_config(SMOKE, [f"data.shards={out}/manifest.json"]))
    return out / "manifest.json"


def launch(record_dir: Path, *overrides: str) -> dict[int, dict]:
    record_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "distributed_train_worker.py"), str(record_dir), "logging.progress_bar=false",
               "sampling.every_steps=0", "train.batch_size=2", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {rank: json.loads((record_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)}


def test_two_processes_split_the_data_average_gradients_export_once_and_resume(demo, tmp_path):
    run = tmp_path / "run"
    common = [f"data.shards={demo}", "train.max_steps=4", "checkpointing.every_steps=2"]
    first = launch(tmp_path / "first", *common, f"output_dir={run}")
    for record in first.values():
        assert record["num_processes"] == 2 and record["backend"] == "gloo"
        assert record["distributed_type"] == "DistributedType.MULTI_CPU"
        assert sorted(record["steps"], key=int) == ["1", "2", "3", "4"]
    keys = {rank: [record["steps"][str(s)]["keys"] for s in range(1, 5)] for rank, record in first.items()}
    for step in range(4):  # each step the two ranks read different samples ...
        assert len(keys[0][step]) == len(keys[1][step]) == 2
        assert not set(keys[0][step]) & set(keys[1][step])
        # ... yet hold the same weights afterwards, and the same (gathered) loss
        assert first[0]["steps"][str(step + 1)]["weights"] == first[1]["steps"][str(step + 1)]["weights"]
        assert first[0]["steps"][str(step + 1)]["loss"] == first[1]["steps"][str(step + 1)]["loss"]
    # 16 demo samples, 4 a global step: one epoch, every sample read exactly once
    everything = [key for rank in (0, 1) for step in keys[rank] for key in step]
    assert len(everything) == len(set(everything)) == 16
    assert len({first[0]["steps"][str(s)]["weights"] for s in range(1, 5)}) == 4  # the weights do move
    # one process exports; checkpoints hold one file set plus each rank's RNG state
    assert [first[r]["exported"] for r in (0, 1)] == [True, False]
    assert (run / "expression_adapter.safetensors").is_file()
    for step in ("step-0000002", "step-0000004"):
        assert sorted(p.name for p in (run / "checkpoints" / step).iterdir()) == [
            "optimizer.pt", "rng-0.pt", "rng-1.pt", "state.json", "trainable.safetensors"]
        assert json.loads((run / "checkpoints" / step / "state.json").read_text())["num_processes"] == 2

    resumed = launch(tmp_path / "resumed", *common, f"output_dir={tmp_path / 'resumed_run'}",
                     f"checkpointing.resume={run / 'checkpoints' / 'step-0000002'}")
    for rank in (0, 1):
        assert resumed[rank]["resumed_from"].endswith("step-0000002")
        assert sorted(resumed[rank]["steps"], key=int) == ["3", "4"]
        for step in ("3", "4"):
            assert resumed[rank]["steps"][step] == first[rank]["steps"][step], (rank, step)
