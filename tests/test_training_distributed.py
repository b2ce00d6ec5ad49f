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


def assert_synchronised(records: dict[int, dict], steps: int) -> list[list[list[str]]]:
    """Both ranks ran under gloo, read different samples each step, and hold the same weights and loss after it."""
    for record in records.values():
        assert record["num_processes"] == 2 and record["backend"] == "gloo"
        assert record["distributed_type"] == "DistributedType.MULTI_CPU"
        assert sorted(record["steps"], key=int) == [str(s) for s in range(1, steps + 1)]
    keys = [[records[rank]["steps"][str(s)]["keys"] for s in range(1, steps + 1)] for rank in (0, 1)]
    for step in range(1, steps + 1):
        assert len(keys[0][step - 1]) == len(keys[1][step - 1]) == 2
        assert not set(keys[0][step - 1]) & set(keys[1][step - 1])
        assert records[0]["steps"][str(step)]["weights"] == records[1]["steps"][str(step)]["weights"]
        assert records[0]["steps"][str(step)]["loss"] == records[1]["steps"][str(step)]["loss"]
    assert [records[r]["exported"] for r in (0, 1)] == [True, False]
    return keys


def test_two_processes_split_the_data_average_gradients_export_once_and_resume(demo, tmp_path):
    run = tmp_path / "run"
    common = [f"data.shards={demo}", "train.max_steps=4", "checkpointing.every_steps=2"]
    first = launch(tmp_path / "first", *common, f"output_dir={run}")
    keys = assert_synchronised(first, 4)
    # 16 demo samples, 4 a global step: one epoch, every sample read exactly once
    everything = [key for rank in (0, 1) for step in keys[rank] for key in step]
    assert len(everything) == len(set(everything)) == 16
    assert len({first[0]["steps"][str(s)]["weights"] for s in range(1, 5)}) == 4  # the weights do move
    # one process exports; checkpoints hold one file set plus each rank's RNG state
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


def test_reference_lora_stage_trains_on_two_processes(demo, tmp_path):
    from adapters.lora import ReferenceLora
    from training.train import Trainer

    # the frozen Expression Adapter this stage needs: one quick single-process step
    expression = Trainer(load_config(SMOKE, [f"data.shards={demo}", f"output_dir={tmp_path / 'ea'}", "train.max_steps=1",
                                             "logging.progress_bar=false", "sampling.every_steps=0"])).run()
    run = tmp_path / "run"
    records = launch(tmp_path / "records", f"data.shards={demo}", f"output_dir={run}", "stage=reference_lora",
                     f"reference_lora.expression_adapter={expression.export_path}", "reference_lora.rank=4",
                     "export.file=pytorch_lora_weights.safetensors", "train.max_steps=2", "checkpointing.every_steps=0")
    assert_synchronised(records, 2)
    lora = ReferenceLora.from_file(run / "pytorch_lora_weights.safetensors")
    assert lora.rank == 4


def test_emojidiff_ica_stage_trains_on_two_processes(demo, tmp_path):
    """EmojiDiff's heaviest stage (teachers, decoder, face networks beside the trained adapter) under gloo."""
    from adapters.e_adapter import EAdapter

    if "clip_image.npy" not in json.loads(demo.read_text())["fields"]:
        pytest.skip("the demo set has no EmojiDiff fields: they need the cached MediaPipe model")
    run = tmp_path / "run"
    records = launch(tmp_path / "records", f"data.shards={demo}", f"output_dir={run}", "stage=emojidiff_ica",
                     "model.tiny_text_encoder={seed: 0}", "emojidiff.standin_published={seed: 0}",
                     "emojidiff.tiny_arcface={seed: 0}", "emojidiff.tiny_fan={seed: 0}", "export.file=e_adapter.safetensors",
                     "train.max_steps=2", "checkpointing.every_steps=0")
    assert_synchronised(records, 2)
    assert EAdapter.from_file(run / "e_adapter.safetensors").layout.name == "SD1.5"


def test_facecrafter_joint_stage_trains_on_two_processes(demo, tmp_path):
    from adapters.facecrafter import FaceCrafter

    run = tmp_path / "run"
    # the ID encoder trains too, and every replica row switches modules on or off: all of it stays in step
    records = launch(tmp_path / "records", f"data.shards={demo}", f"output_dir={run}", "stage=facecrafter_joint",
                     "facecrafter.lmk={image_size: 64, channels: [8, 8, 16, 16, 32, 32], token_dim: 32, res_blocks: 1, groups: 8}",
                     "facecrafter.emo={hidden_dim: 32, token_dim: 32, num_tokens: 4}", "facecrafter.replicas=2",
                     "facecrafter.expression_threshold=0.02", "export.file=facecrafter.safetensors", "train.max_steps=2",
                     "checkpointing.every_steps=0")
    assert_synchronised(records, 2)
    assert sorted(FaceCrafter.from_file(run / "facecrafter.safetensors").modules_present()) == ["emo", "lmk"]
    assert (run / "id_encoder" / "model.safetensors").is_file()
