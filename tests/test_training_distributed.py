"""Multi-process training on this CPU machine, as users scale out on GPUs: torchrun with 2 processes (gloo).

Each process records its batches, losses and a digest of its trainable weights after every step
(tests/distributed_train_worker.py). The ranks must read different samples, hold identical weights
after each step (gradients averaged: with different data they would otherwise part), export once,
and a run resumed from a 2-process checkpoint must continue exactly as the uninterrupted one.
EmojiDiff's IDI (``python -m training.idi``) under torchrun splits its rows between the processes
(tests/distributed_idi_worker.py records them) and writes exactly what one process writes.
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
from training.shards import load_index

pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = "training/configs/smoke.yaml"
EMOJIDIFF_SMOKE = {stage: f"training/configs/emojidiff_{stage}_smoke.yaml" for stage in ("base", "refined", "refined_sdxl", "ica")}
IDI_SMOKE = "training/configs/emojidiff_idi_smoke.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, mediapipe_task):
    """The demo set with EmojiDiff's fields: the demo builder finds the real MediaPipe model in the test cache,
    where the ``mediapipe_task`` fixture has put it."""
    from training.demo_data import find_face_landmarker

    assert find_face_landmarker() == mediapipe_task
    out = tmp_path_factory.mktemp("demo")
    build_demo_data(out, load_config(SMOKE, [f"data.shards={out}/manifest.json"]))
    return out / "manifest.json"


def torchrun(worker: str, record_dir: Path, arguments: list[str], processes: int = 2) -> dict[int, dict]:
    """``processes`` ranks of tests/<worker> under torchrun; each rank's record."""
    record_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(ROOT / "tests" / worker), str(record_dir), *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {rank: json.loads((record_dir / f"rank-{rank}.json").read_text()) for rank in range(processes)}


def launch(record_dir: Path, *overrides: str, config: str = SMOKE) -> dict[int, dict]:
    """A 2-process training run of ``config`` (batch 2 per process)."""
    return torchrun("distributed_train_worker.py", record_dir, [config, "logging.progress_bar=false",
                                                                "sampling.every_steps=0", "train.batch_size=2", *overrides])


def needs_emojidiff_fields(demo: Path) -> None:
    fields = json.loads(demo.read_text())["fields"]
    assert "clip_image.npy" in fields, f"the demo set was built without EmojiDiff's fields (it has {fields})"


@pytest.fixture(scope="module")
def base_export(demo, tmp_path_factory):
    """A one-step emojidiff_base export (one process): the adapter IDI renders with."""
    from training.train import Trainer

    needs_emojidiff_fields(demo)
    out = tmp_path_factory.mktemp("emojidiff_base")
    config = load_config(EMOJIDIFF_SMOKE["base"], [f"data.shards={demo}", f"output_dir={out}", "train.max_steps=1",
                                                   "logging.progress_bar=false", "sampling.every_steps=0"])
    return Trainer(config).run().export_path


@pytest.fixture(scope="module")
def idi_runs(demo, base_export, mediapipe_task, tmp_path_factory):
    """IDI on the 16 demo samples (4 shards of 4) under torchrun: with 2 processes and with 1. The filter keeps
    every pair with a face (the refined stage below trains on the triplets)."""
    root = tmp_path_factory.mktemp("idi")
    runs = {}
    for processes in (2, 1):
        out = root / f"out-{processes}"
        overrides = [f"data.shards={demo}", f"idi.adapter={base_export}", f"idi.out={out}",
                     f"idi.landmarker={mediapipe_task}", "data.demo_if_missing=false", "idi.steps=2",
                     "idi.max_exp_mean=1", "idi.max_lms=100"]
        arguments = ["--config", IDI_SMOKE, *(f"--set={o}" for o in overrides)]
        runs[processes] = out, torchrun("distributed_idi_worker.py", root / f"records-{processes}", arguments, processes)
    return runs


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


@pytest.mark.parametrize("stage, config, steps, export, resume", [
    ("expression_adapter", SMOKE, 4, "expression_adapter.safetensors", True),
    ("emojidiff_base", EMOJIDIFF_SMOKE["base"], 2, "e_adapter.safetensors", True),
    ("emojidiff_refined", EMOJIDIFF_SMOKE["refined"], 2, "e_adapter.safetensors", True),
    # the SDXL shape (pooled text, time ids, random scaling) under gloo; its resume is the SD1.5 refined one's code
    ("emojidiff_refined_sdxl", EMOJIDIFF_SMOKE["refined_sdxl"], 2, "e_adapter.safetensors", False),
])
def test_two_processes_split_the_data_average_gradients_export_once_and_resume(stage, config, steps, export, resume,
                                                                                demo, request, tmp_path):
    data = demo
    if stage.startswith("emojidiff_refined"):  # trained on the cross-identity triplets IDI wrote
        data = request.getfixturevalue("idi_runs")[2][0] / "manifest.json"
    elif stage.startswith("emojidiff"):
        needs_emojidiff_fields(demo)
    every = steps // 2
    run = tmp_path / "run"
    common = [f"data.shards={data}", f"train.max_steps={steps}", f"checkpointing.every_steps={every}"]
    first = launch(tmp_path / "first", *common, f"output_dir={run}", config=config)
    keys = assert_synchronised(first, steps)
    # 16 samples, 4 a global step: no sample read twice within the epoch (in 4 steps, each read once)
    everything = [key for rank in (0, 1) for step in keys[rank] for key in step]
    assert len(everything) == len(set(everything)) == 4 * steps
    assert len({first[0]["steps"][str(s)]["weights"] for s in range(1, steps + 1)}) == steps  # the weights do move
    # one process exports; checkpoints hold one file set plus each rank's RNG state
    assert (run / export).is_file()
    for step in (every, steps):
        folder = run / "checkpoints" / f"step-{step:07d}"
        assert sorted(p.name for p in folder.iterdir()) == [
            "optimizer.pt", "rng-0.pt", "rng-1.pt", "state.json", "trainable.safetensors"]
        assert json.loads((folder / "state.json").read_text())["num_processes"] == 2
    if not resume:
        return
    resumed = launch(tmp_path / "resumed", *common, f"output_dir={tmp_path / 'resumed_run'}",
                     f"checkpointing.resume={run / 'checkpoints' / f'step-{every:07d}'}", config=config)
    for rank in (0, 1):
        assert resumed[rank]["resumed_from"].endswith(f"step-{every:07d}")
        assert sorted(resumed[rank]["steps"], key=int) == [str(s) for s in range(every + 1, steps + 1)]
        for step in range(every + 1, steps + 1):
            assert resumed[rank]["steps"][str(step)] == first[rank]["steps"][str(step)], (rank, step)


def test_idi_under_torchrun_splits_the_rows_and_writes_what_one_process_writes(idi_runs):
    (two, records), (one, single) = idi_runs[2], idi_runs[1]
    # 16 rows, 4 a shard: rank r renders the rows of shards r and r + 2, each row once
    for rank in (0, 1):
        assert records[rank]["world_size"] == 2
        assert records[rank]["rows"] == [row for shard in (rank, rank + 2) for row in range(4 * shard, 4 * shard + 4)]
    assert single[0]["world_size"] == 1 and single[0]["rows"] == list(range(16))
    assert (two / "manifest.json").is_file()
    for k in range(4):
        name = f"shard-{k:06d}.tar"
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    keys = [sample["key"] for record in load_index(two / "manifest.json") for sample in record["samples"]]
    assert sorted(keys) == [f"idi-{row:08d}" for row in range(16)]
    assert json.loads((two / "idi_report.json").read_text())["kept"] == 16


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

    needs_emojidiff_fields(demo)
    run = tmp_path / "run"
    records = launch(tmp_path / "records", f"data.shards={demo}", f"output_dir={run}", "train.max_steps=2",
                     "checkpointing.every_steps=0", config=EMOJIDIFF_SMOKE["ica"])
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
