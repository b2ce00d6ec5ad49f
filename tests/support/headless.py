"""Workflows run as users run them: ``python workflows/run.py`` in a process of its own.

The full-size runs load several GB of random weights. In their own process that memory leaves with
the process, so the suite's peak is one workflow's whatever ran before it, and one broken run cannot
leave models behind in the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN_PY = Path(__file__).resolve().parents[2] / "workflows" / "run.py"


def run_arguments(folder: Path, models=(), variants=()) -> list[str]:
    """run.py's arguments for a run on the CPU with its input/, output/ and temp/ folders in ``folder``,
    the ``models`` folders (the last searched first) and the ``variants``."""
    return ["--cpu", *(argument for name in ("output", "input", "temp") for argument in (f"--{name}-dir", str(folder / name))),
            *(argument for models_dir in models for argument in ("--models", str(models_dir))),
            *(argument for variant in variants for argument in ("--variant", variant))]


def run_workflow(comfyui: Path, workflow: Path | dict, folder: Path, *arguments, models=(), variants=(),
                 comfyui_flags: str = "", timeout: float = 900) -> list[list[Path]]:
    """The images each run saved: the workflow's own run first, then one list per ``variants`` entry.

    ``folder`` gets ComfyUI's input/, output/ and temp/ folders (a workflow given as a dict is written
    there too); ``arguments`` are run.py's (``--set``, ``--image``, ``--seed`` ...); ``models`` are
    extra models folders in ComfyUI's layout, the last searched first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(workflow, dict):
        path = folder / "workflow.json"
        path.write_text(json.dumps(workflow, indent=1))
        workflow = path
    command = [sys.executable, str(RUN_PY), str(workflow), "--comfyui", str(comfyui),
               *(f"--comfyui-flags={comfyui_flags}",)[:bool(comfyui_flags)], *map(str, arguments),
               *run_arguments(folder, models, variants)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if finished.returncode != 0:
        raise AssertionError(f"workflows/run.py {workflow.name} exited with {finished.returncode}:\n"
                             f"{finished.stderr[-6000:]}\n{finished.stdout[-2000:]}")
    runs: list[list[Path]] = [[]]
    for line in finished.stdout.splitlines():
        if line.startswith("# run "):
            runs.append([])
        elif line.endswith(".png") and Path(line).is_file():
            runs[-1].append(Path(line))
    assert len(runs) == 1 + len(variants), finished.stdout
    return runs
