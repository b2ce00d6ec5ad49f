"""The shipped workflows' headless runs (tests/test_workflows.py checks them), and how they start early.

Every API workflow runs through the README's headless code (workflows/run.py: ComfyUI's own loaders and
PromptExecutor) on full-size random weights in the published formats (workflow_models), at 64x64 with 2 steps,
and again with this pack's strengths at 0 (``variants``). Workflows that share ComfyUI's flags and other packs
run one after another in one ComfyUI process of their own (workflow_jobs.py), so their models never sit in
the test process and each run's peak memory is its own.

Writing the models and running every group is one process, ``python -m support.workflow_runs``. The session
starts it in the background as soon as tests that need it are selected (``BackgroundRuns``, from
tests/conftest.py), on one torch thread: they run while the in-process tests do (on two pytest-xdist workers,
all three share the two cores alike), and test_workflows.py, collected last, reads their results. The SD1.5
group goes first; each SDXL group (12 to 14 GB) waits its turn (``cache_locks.taking_turns(LARGE_MEMORY)``) with
the test modules marked ``large_memory``, so that the memory of the test processes and of a run never add up to
more than the machine has.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

from PIL import Image

from support.cache_locks import LARGE_MEMORY, taking_turns
from support.comfy_browser import sample_photo, write_video
from support.headless import run_arguments
from support.onnx_face_models import face_crop, insightface_images, load_t1
from support.pack_snapshots import INSTANTID, extract, packs_for
from support.workflow_models import write_instantid_face_models, write_workflow_models

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.json"))
SIZE, STEPS = 64, 2
JOBS_SCRIPT = Path(__file__).resolve().parents[1] / "workflow_jobs.py"
# SDXL (2.6B parameters) and emojidiff_compare (two SD1.5 UNets): weights kept in bf16 for half the memory,
# still computed in fp32 on the CPU (ComfyUI casts layer by layer)
HALF_WEIGHTS, HALF_FLAGS = ("emojidiff_sdxl", "emojidiff_compare", "emojidiff_sdxl_instantid"), "--bf16-unet --bf16-text-enc"
VIDEO_FRAMES = 4
PACK_PREFIX = "ExpressionAdapters"


def small(prompt: dict) -> list[str]:
    """--set overrides that make any workflow cheap: 64x64 latents, 2 sampling steps, 4 video frames."""
    sets = []
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind == "EmptyLatentImage":
            sets += ["--set", f"{node_id}.width={SIZE}", "--set", f"{node_id}.height={SIZE}"]
            if any(other["class_type"] == "LoadVideo" for other in prompt.values()):
                sets += ["--set", f"{node_id}.batch_size={VIDEO_FRAMES}"]
        if kind in ("KSampler", "KSamplerAdvanced", "BasicScheduler"):
            sets += ["--set", f"{node_id}.steps={STEPS}"]
        if kind == "ImageFromBatch":
            sets += ["--set", f"{node_id}.length={VIDEO_FRAMES}"]
    return sets


def switched_off(prompt: dict) -> str:
    """A --variant with every strength of this pack's nodes at 0 ("" when the workflow has none)."""
    return " ".join(f"{node_id}.{name}=0" for node_id, node in prompt.items() if node["class_type"].startswith(PACK_PREFIX)
                    for name, value in node["inputs"].items() if name.endswith("strength") and not isinstance(value, list))


# Further reruns of workflows that stack another pack with ours, each with one input at 0: {name: (node type, input)}
INSTANTID_WORKFLOW = WORKFLOWS / "api" / "emojidiff_sdxl_instantid.json"
STACK_VARIANTS = {
    INSTANTID_WORKFLOW.stem: {"expression off": (f"{PACK_PREFIX}ApplyEAdapter", "expression_strength"),
                              "InstantID off": ("InstantIDAttentionPatch", "weight")},
}


def variants(api_path: Path) -> dict[str, str]:
    """The workflow's --variant runs by name: "strengths off" (this pack's strengths at 0) and its STACK_VARIANTS."""
    prompt = load(api_path)
    found = {"strengths off": switched_off(prompt)}
    for name, (class_type, input_name) in STACK_VARIANTS.get(api_path.stem, {}).items():
        found[name] = " ".join(f"{node_id}.{input_name}=0" for node_id, node in prompt.items() if node["class_type"] == class_type)
        assert found[name], f"{api_path.stem} has no {class_type}"
    return {name: variant for name, variant in found.items() if variant}


def load(api_path: Path) -> dict:
    return json.loads(api_path.read_text())


WITH_STRENGTHS = [path for path in API_WORKFLOWS if switched_off(load(path))]


def write_photos(folder: Path, t1) -> dict[str, Path]:
    """t1.jpg (where the stand-in detectors find faces), a crop of its second face (large enough for MediaPipe),
    a real portrait for MediaPipe, and a short video of it."""
    rgb, boxes, _ = t1
    folder.mkdir(parents=True)
    Image.fromarray(face_crop(rgb, boxes[1])).save(folder / "expression.png")
    write_video(folder / "facecrafter_driving.mp4", Image.open(sample_photo()).convert("RGB"))
    return {"t1": insightface_images() / "t1.jpg", "expression": folder / "expression.png", "portrait": sample_photo(),
            "video": folder / "facecrafter_driving.mp4"}


def photo_for(prompt: dict, node_id: str, photos: dict) -> Path:
    """MediaPipe needs a face that fills the picture; the stand-in face detectors find t1.jpg's faces."""
    name = prompt[node_id]["inputs"]["image"]
    if name == "emojidiff_expression.jpg":
        return photos["expression"]
    landmarked = any(node["class_type"] == f"{PACK_PREFIX}FaceLandmarks" and node["inputs"].get("image") == [node_id, 0]
                     for node in prompt.values())
    return photos["portrait"] if landmarked and name != "emojidiff_identity.jpg" else photos["t1"]


def job(api_path: Path, folder: Path, models: list[Path], photos: dict) -> list[str]:
    """workflows/run.py's arguments for one workflow: its photos, the small settings, and its variants."""
    prompt = load(api_path)
    (folder / "input").mkdir(parents=True)
    if any(node["class_type"] == "LoadVideo" for node in prompt.values()):
        shutil.copyfile(photos["video"], folder / "input" / photos["video"].name)
    images = [argument for node_id, node in prompt.items() if node["class_type"] == "LoadImage"
              for argument in ("--image", f"{node_id}={photo_for(prompt, node_id, photos)}")]
    return [str(api_path), *small(prompt), *images, "--seed", "7",
            *run_arguments(folder, models, list(variants(api_path).values()))]


# glibc's malloc, as environment settings for the jobs' process: hand out blocks up to 32 MB from its heap and keep
# what is freed there. By default it returns freed memory to the kernel at once, and ComfyUI casts each bf16 weight
# to fp32 for every layer of every step, so each step faulted in GBs of fresh zeroed pages again. Measured on the
# SDXL group: 17.5M page faults and 150 CPU-s by default, 5.0M and 108 CPU-s with these; the same peak memory
# (workflow_jobs.py trims the heap between jobs).
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
                     "MALLOC_TOP_PAD_": str(2**30)}


def run_jobs(comfyui: Path, folder: Path, jobs: dict, flags: str, custom_nodes=()) -> dict:
    """The jobs in one ComfyUI process of their own (with the other packs in ``custom_nodes`` loaded); a job it
    never reported gets that process's error."""
    jobs_file, results_file = folder / "jobs.json", folder / "results.json"
    folder.mkdir(parents=True, exist_ok=True)
    jobs_file.write_text(json.dumps({"comfyui": str(comfyui), "comfyui_flags": flags,
                                     "custom_nodes": [str(path) for path in custom_nodes], "jobs": jobs}, indent=1))
    finished = subprocess.run([sys.executable, str(JOBS_SCRIPT), str(jobs_file), str(results_file)],
                              capture_output=True, text=True, timeout=1800, env=os.environ | KEEP_FREED_MEMORY)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    crash = f"workflow_jobs.py exited with {finished.returncode} before this job ended:\n{finished.stderr[-6000:]}"
    return {name: results.get(name, {"runs": [], "error": crash, "peak_anon_gb": None}) for name in jobs}


# the most a run may hold; SDXL (12.4 GB measured) with ViT-H and a 700M-parameter E-Adapter needs more, and with
# InstantID's 425M-parameter model too (13.4 to 14.4 GB measured)
PEAK_GB = {"emojidiff_sdxl": 16.0, "emojidiff_sdxl_instantid": 16.0}
DEFAULT_PEAK_GB = 8.0  # issue 9's aim


def prepare(root: Path, comfyui: Path, landmarker: Path) -> list[dict]:
    """The models, photos and folders of every API workflow's run; the groups of jobs that share ComfyUI's flags
    and other packs, each ``{"flags", "packs", "jobs": {name: run.py arguments}}``.
    ``landmarker``: MediaPipe's real face_landmarker.task (the ``mediapipe_task`` fixture's)."""
    t1 = load_t1()
    if t1 is None:
        raise FileNotFoundError("the shared test data t1_faces.npz is missing (support.onnx_face_models.TESTDATA)")
    custom_nodes, comfyui_base = root / "custom_nodes", root / "comfyui_base"
    models = write_workflow_models(root / "models", t1, comfyui, instantid_pack=extract(INSTANTID, custom_nodes),
                                   landmarker=landmarker)
    write_instantid_face_models(comfyui_base, t1)
    photos = write_photos(root / "photos", t1)
    groups: dict[tuple, dict] = {}  # (ComfyUI's flags, other packs) -> jobs
    for api_path in API_WORKFLOWS:
        flags = HALF_FLAGS if api_path.stem in HALF_WEIGHTS else ""
        packs = tuple(str(extract(tarball, custom_nodes)) for tarball in packs_for(load(api_path)))
        if packs:  # InstantID's face analysis reads ComfyUI's own models folder, here comfyui_base/models
            flags += f" --base-directory {comfyui_base}"
        groups.setdefault((flags, packs), {})[api_path.stem] = job(api_path, root / api_path.stem, models, photos)
    return [{"flags": flags, "packs": list(packs), "jobs": jobs} for (flags, packs), jobs in groups.items()]


def light(group: dict) -> bool:
    """Whether the group's runs may hold at most DEFAULT_PEAK_GB each (SD1.5; SDXL's may hold twice as much)."""
    return all(PEAK_GB.get(name, DEFAULT_PEAK_GB) <= DEFAULT_PEAK_GB for name in group["jobs"])


def run_groups(root: Path, comfyui: Path, plan: list[dict]) -> dict:
    """``{name: result}`` of the plan's groups, each in a ComfyUI process of its own (folders ``root/group<N>``, N the
    group's place in the plan): the light ones first, then each of the others in its turn (``LARGE_MEMORY``)."""
    results = {}
    for number, group in sorted(enumerate(plan), key=lambda numbered: not light(numbered[1])):
        with nullcontext() if light(group) else taking_turns(LARGE_MEMORY):
            results |= run_jobs(comfyui, root / f"group{number}", group["jobs"], group["flags"], group["packs"])
    return results


RESULTS, FAILED, PROCESS = "results.json", "failed.txt", "process.txt"
# The background's share of a 2-core machine: one core. With torch's default of a thread per core, each OpenMP
# region waits, spinning, for the thread whose core the tests hold: measured beside other work, 2.6 times the
# CPU-seconds for the same jobs (arc2face_expression 33 against 12.6, facecrafter_composition 54 against 19.7).
ONE_CORE = {"OMP_NUM_THREADS": "1"}


class BackgroundRuns:
    """``prepare`` and ``run_groups`` in a process of their own (:meth:`start`), on one torch thread (``ONE_CORE``);
    :meth:`results` waits for them. Another test process (a pytest-xdist worker) reads the same runs through
    :meth:`attach` and the same ``root``; ``process`` is None there."""

    def __init__(self, root: Path, process: subprocess.Popen | None = None):
        self.root, self.process = root, process
        self.log = root / "workflow_runs.log"

    @classmethod
    def start(cls, root: Path, comfyui: Path, landmarker: Path) -> BackgroundRuns:
        here = Path(__file__).resolve().parents[1]  # tests/, where ``support`` is
        env = os.environ | ONE_CORE | {"PYTHONPATH": os.pathsep.join(map(str, (here, here.parent)))}
        with open(root / "workflow_runs.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "support.workflow_runs", str(root), str(comfyui), str(landmarker)],
                cwd=here, env=env, stdout=log, stderr=subprocess.STDOUT)
        (root / PROCESS).write_text(str(process.pid))
        return cls(root, process)

    @classmethod
    def attach(cls, root: Path) -> BackgroundRuns:
        """The runs another process started in ``root`` (it may not have started them yet)."""
        return cls(root)

    def results(self, timeout: float = 3600) -> dict:
        deadline = time.monotonic() + timeout
        while not self._ended():
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the workflow runs took over {timeout} s:\n{self._log_tail()}")
            time.sleep(0.5)
        if not (self.root / RESULTS).is_file():
            failure = (self.root / FAILED).read_text() if (self.root / FAILED).is_file() else ""
            raise AssertionError(f"support.workflow_runs ended without results:\n{failure}{self._log_tail()}")
        return json.loads((self.root / RESULTS).read_text())

    def _ended(self) -> bool:
        """Results or a failure written, or the process gone (killed before it could write either)."""
        if (self.root / RESULTS).is_file() or (self.root / FAILED).is_file():
            return True
        if self.process is not None:
            return self.process.poll() is not None
        if not (self.root / PROCESS).is_file():
            return False  # the starting process has not got to it yet
        stat = Path(f"/proc/{(self.root / PROCESS).read_text()}/stat")
        try:  # the third field is the state: Z, exited but not yet reaped by the process that started it
            return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.is_file() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def main(out: Path, comfyui: Path, landmarker: Path) -> None:
    """Writes RESULTS (atomically: a reader never sees half of it), or FAILED with the traceback."""
    try:
        results = run_groups(out, comfyui, prepare(out, comfyui, landmarker))
    except BaseException:
        (out / FAILED).write_text(traceback.format_exc())
        raise
    (out / f"{RESULTS}.partial").write_text(json.dumps(results, indent=1))
    os.replace(out / f"{RESULTS}.partial", out / RESULTS)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
