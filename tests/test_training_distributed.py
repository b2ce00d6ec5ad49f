"""Multi-process training on this CPU machine, as users scale out on GPUs: torchrun with 2 processes (gloo).

Each process records its batches, losses and a digest of its trainable weights after every step
(tests/distributed_train_worker.py). The ranks must read different samples, hold identical weights
after each step (gradients averaged: with different data they would otherwise part), export once,
and a run resumed from a 2-process checkpoint must continue exactly as the uninterrupted one.
EmojiDiff's IDI (``python -m training.idi``) under torchrun splits its rows between the processes
(the worker records them) and writes exactly what one process writes.

Starting a rank (torch, diffusers, transformers, gloo) costs far more than a smoke run's steps, so the runs the
selected tests read start together (the ``runs`` fixture), in two torchrun launches whose ranks run their jobs one
after the other: IDI and the first run of every stage, then the resumed runs on 2 fresh processes, as after a
kill. The one-process IDI run is the same job in the test process. Each test checks its own runs' records.
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
pytestmark = [pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[1]
SMOKE = "training/configs/smoke.yaml"
EMOJIDIFF_SMOKE = {stage: f"training/configs/emojidiff_{stage}_smoke.yaml" for stage in ("base", "refined", "refined_sdxl", "ica")}
IDI_SMOKE = "training/configs/emojidiff_idi_smoke.yaml"
# stage, config, steps, exported file, resumed
STAGE_RUNS = [
    ("expression_adapter", SMOKE, 4, "expression_adapter.safetensors", True),
    ("emojidiff_base", EMOJIDIFF_SMOKE["base"], 2, "e_adapter.safetensors", True),
    ("emojidiff_refined", EMOJIDIFF_SMOKE["refined"], 2, "e_adapter.safetensors", True),
    # the SDXL shape (pooled text, time ids, random scaling) under gloo; its resume is the SD1.5 refined one's code
    ("emojidiff_refined_sdxl", EMOJIDIFF_SMOKE["refined_sdxl"], 2, "e_adapter.safetensors", False),
]
# the runs each other test reads (the stage test reads its stage's, see ``wanted_runs``)
RUNS_READ = {
    "test_idi_under_torchrun_splits_the_rows_and_writes_what_one_process_writes": {"idi-2", "idi-1"},
    "test_reference_lora_stage_trains_on_two_processes": {"reference_lora"},
    "test_emojidiff_ica_stage_trains_on_two_processes": {"emojidiff_ica"},
    "test_facecrafter_joint_stage_trains_on_two_processes": {"facecrafter_joint"},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, mediapipe_task):
    """The demo set with EmojiDiff's fields: the demo builder finds the real MediaPipe model in the test cache,
    where the ``mediapipe_task`` fixture has put it."""
    from training.demo_data import find_face_landmarker

    assert find_face_landmarker() == mediapipe_task
    out = tmp_path_factory.mktemp("demo")
    build_demo_data(out, load_config(SMOKE, [f"data.shards={out}/manifest.json"]))
    return out / "manifest.json"


def torchrun(record_dir: Path, jobs: list[dict], processes: int = 2) -> str | None:
    """``jobs`` (see tests/distributed_train_worker.py) on ``processes`` ranks under torchrun; None when it
    succeeded, else the end of what it printed."""
    record_dir.mkdir(parents=True)
    (record_dir / "jobs.json").write_text(json.dumps(jobs, indent=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(ROOT / "tests" / "distributed_train_worker.py"), str(record_dir), str(record_dir / "jobs.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return None if done.returncode == 0 else done.stdout[-3000:] + done.stderr[-5000:]


def train_job(name: str, config: str, *overrides: str) -> dict:
    """A 2-process training run of ``config`` (batch 2 per process)."""
    return {"name": name, "kind": "train", "arguments": [config, "logging.progress_bar=false", "sampling.every_steps=0",
                                                         "train.batch_size=2", *overrides]}


def needs_emojidiff_fields(demo: Path) -> None:
    fields = json.loads(demo.read_text())["fields"]
    assert "clip_image.npy" in fields, f"the demo set was built without EmojiDiff's fields (it has {fields})"


def wanted_runs(request) -> set[str]:
    """The runs this module's selected tests read."""
    wanted = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        if item.originalname in RUNS_READ:
            wanted |= RUNS_READ[item.originalname]
            continue
        stage = item.callspec.params["stage"]
        wanted |= {stage, f"{stage}-resumed"} if item.callspec.params["resume"] else {stage}
        if stage.startswith("emojidiff_refined"):  # trained on the cross-identity triplets IDI wrote
            wanted.add("idi-2")
    return wanted


class Runs:
    """Each run's records (rank -> record), by name; ``root`` holds the runs' output folders."""

    def __init__(self, root: Path):
        self.root = root
        self.launched: dict[str, tuple[Path, int, str | None]] = {}

    def launch(self, name: str, jobs: list[dict], processes: int = 2) -> None:
        if jobs:
            failure = torchrun(self.root / f"records-{name}", jobs, processes)
            for job in jobs:
                self.launched[job["name"]] = self.root / f"records-{name}" / job["name"], processes, failure

    def record(self, job: dict, rank: int, record: dict) -> None:
        """A job this process ran."""
        folder = self.root / "records-here" / job["name"]
        folder.mkdir(parents=True)
        (folder / f"rank-{rank}.json").write_text(json.dumps(record, indent=1))
        self.launched[job["name"]] = folder, 1, None

    def __getitem__(self, name: str) -> dict[int, dict]:
        folder, processes, failure = self.launched[name]
        files = [folder / f"rank-{rank}.json" for rank in range(processes)]
        assert all(f.is_file() for f in files), f"torchrun did not record run {name}:\n{failure}"
        return {rank: json.loads(f.read_text()) for rank, f in enumerate(files)}


@pytest.fixture(scope="module")
def runs(request, demo, mediapipe_task, tmp_path_factory) -> Runs:
    """Every run the selected tests read, with the one-process runs they start from."""
    from training.train import Trainer

    wanted = wanted_runs(request)
    runs = Runs(tmp_path_factory.mktemp("distributed"))
    root = runs.root
    first, resumed, idi = [], [], {}
    one_step = ["train.max_steps=1", "logging.progress_bar=false", "sampling.every_steps=0"]
    if wanted & {"idi-2", "idi-1"}:
        # IDI on the 16 demo samples (4 shards of 4), rendered by a one-step emojidiff_base export (one process).
        # The filter keeps every pair with a face (the refined stages train on the triplets of the 2-process run).
        needs_emojidiff_fields(demo)
        base = Trainer(load_config(EMOJIDIFF_SMOKE["base"], [f"data.shards={demo}", f"output_dir={root / 'base'}",
                                                             *one_step])).run().export_path
        for processes in (2, 1):
            overrides = [f"data.shards={demo}", f"idi.adapter={base}", f"idi.out={root / f'idi-out-{processes}'}",
                         f"idi.landmarker={mediapipe_task}", "data.demo_if_missing=false", "idi.steps=2",
                         "idi.max_exp_mean=1", "idi.max_lms=100"]
            idi[processes] = {"name": f"idi-{processes}", "kind": "idi",
                              "arguments": ["--config", IDI_SMOKE, *(f"--set={o}" for o in overrides)]}
        if "idi-2" in wanted:
            first.append(idi[2])
    for stage, config, steps, _, _ in STAGE_RUNS:
        data = root / "idi-out-2" / "manifest.json" if stage.startswith("emojidiff_refined") else demo
        common = [f"data.shards={data}", f"train.max_steps={steps}", f"checkpointing.every_steps={steps // 2}"]
        if stage in wanted:
            first.append(train_job(stage, config, *common, f"output_dir={root / stage / 'run'}"))
        if f"{stage}-resumed" in wanted:
            checkpoint = root / stage / "run" / "checkpoints" / f"step-{steps // 2:07d}"
            resumed.append(train_job(f"{stage}-resumed", config, *common, f"output_dir={root / stage / 'resumed_run'}",
                                     f"checkpointing.resume={checkpoint}"))
    if "reference_lora" in wanted:
        # the frozen Expression Adapter this stage needs: one quick single-process step
        expression = Trainer(load_config(SMOKE, [f"data.shards={demo}", f"output_dir={root / 'ea'}", *one_step])).run()
        first.append(train_job("reference_lora", SMOKE, f"data.shards={demo}", f"output_dir={root / 'reference_lora'}",
                               "stage=reference_lora", f"reference_lora.expression_adapter={expression.export_path}",
                               "reference_lora.rank=4", "export.file=pytorch_lora_weights.safetensors",
                               "train.max_steps=2", "checkpointing.every_steps=0"))
    if "emojidiff_ica" in wanted:
        first.append(train_job("emojidiff_ica", EMOJIDIFF_SMOKE["ica"], f"data.shards={demo}",
                               f"output_dir={root / 'emojidiff_ica'}", "train.max_steps=2", "checkpointing.every_steps=0"))
    if "facecrafter_joint" in wanted:
        # the ID encoder trains too, and every replica row switches modules on or off: all of it stays in step
        first.append(train_job(
            "facecrafter_joint", SMOKE, f"data.shards={demo}", f"output_dir={root / 'facecrafter_joint'}",
            "stage=facecrafter_joint",
            "facecrafter.lmk={image_size: 64, channels: [8, 8, 16, 16, 32, 32], token_dim: 32, res_blocks: 1, groups: 8}",
            "facecrafter.emo={hidden_dim: 32, token_dim: 32, num_tokens: 4}", "facecrafter.replicas=2",
            "facecrafter.expression_threshold=0.02", "export.file=facecrafter.safetensors", "train.max_steps=2",
            "checkpointing.every_steps=0"))
    runs.launch("first", first)
    if "idi-1" in wanted:  # one process, this one: the worker's job without torchrun
        from distributed_train_worker import idi_rows

        runs.record(idi[1], *idi_rows(*idi[1]["arguments"]))
    runs.launch("resumed", resumed)  # fresh processes, from the first runs' checkpoints
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


@pytest.mark.parametrize("stage, config, steps, export, resume", STAGE_RUNS)
def test_two_processes_split_the_data_average_gradients_export_once_and_resume(stage, config, steps, export, resume,
                                                                                demo, runs):
    if stage.startswith("emojidiff") and not stage.startswith("emojidiff_refined"):
        needs_emojidiff_fields(demo)
    every = steps // 2
    run = runs.root / stage / "run"  # trained on ``config`` (see ``runs``)
    first = runs[stage]
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
    resumed = runs[f"{stage}-resumed"]
    for rank in (0, 1):
        assert resumed[rank]["resumed_from"].endswith(f"step-{every:07d}")
        assert sorted(resumed[rank]["steps"], key=int) == [str(s) for s in range(every + 1, steps + 1)]
        for step in range(every + 1, steps + 1):
            assert resumed[rank]["steps"][str(step)] == first[rank]["steps"][str(step)], (rank, step)


def test_idi_under_torchrun_splits_the_rows_and_writes_what_one_process_writes(runs):
    records, single = runs["idi-2"], runs["idi-1"]
    two, one = runs.root / "idi-out-2", runs.root / "idi-out-1"
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


def test_reference_lora_stage_trains_on_two_processes(runs):
    from adapters.lora import ReferenceLora

    assert_synchronised(runs["reference_lora"], 2)
    lora = ReferenceLora.from_file(runs.root / "reference_lora" / "pytorch_lora_weights.safetensors")
    assert lora.rank == 4


def test_emojidiff_ica_stage_trains_on_two_processes(demo, runs):
    """EmojiDiff's heaviest stage (teachers, decoder, face networks beside the trained adapter) under gloo."""
    from adapters.e_adapter import EAdapter

    needs_emojidiff_fields(demo)
    assert_synchronised(runs["emojidiff_ica"], 2)
    assert EAdapter.from_file(runs.root / "emojidiff_ica" / "e_adapter.safetensors").layout.name == "SD1.5"


def test_facecrafter_joint_stage_trains_on_two_processes(runs):
    from adapters.facecrafter import FaceCrafter

    assert_synchronised(runs["facecrafter_joint"], 2)
    run = runs.root / "facecrafter_joint"
    assert sorted(FaceCrafter.from_file(run / "facecrafter.safetensors").modules_present()) == ["emo", "lmk"]
    assert (run / "id_encoder" / "model.safetensors").is_file()
