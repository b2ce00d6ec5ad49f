"""Several workflow runs, one after another, in one ComfyUI process started once (for tests/test_workflows.py).

    python tests/workflow_jobs.py JOBS.json RESULTS.json

JOBS.json: ``{"comfyui": PATH, "comfyui_flags": "...", "custom_nodes": [other packs' folders, loaded by ComfyUI's
loader as run.py's --custom-nodes does], "jobs": {NAME: [workflows/run.py arguments ...]}}``.
RESULTS.json, rewritten after each job: ``{NAME: {"runs": [[saved png, ...] per run], "error": traceback or
null, "seconds": s, "cpu_seconds": the CPU time it took, "peak_gb": the job's peak resident memory,
"peak_anon_gb": the peak of the part that is not mapped files (model files read through mmap count in the first,
and the kernel can drop them)}}``.

The full-size models stay out of the test process, which keeps its memory small, and ComfyUI starts
once for all jobs. Each job gets its own executor and ComfyUI's models are unloaded after it, so each
starts as the first prompt of a fresh ComfyUI does; its peak memory is measured from its own start
(the kernel's high-water mark, reset per job; the anonymous part sampled every 20 ms).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflows import run  # noqa: E402  (the pack's root must be importable first)


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident size


def status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


PAGE_GB = os.sysconf("SC_PAGE_SIZE") / 2**30


def anonymous_gb() -> float:
    """RssAnon, read from /proc/self/statm (resident minus file-backed and shared pages): /proc/self/status formats
    some fifty fields, which cost this process several CPU-seconds a minute at the sampling rate below."""
    resident, shared = map(int, Path("/proc/self/statm").read_text().split()[1:3])
    return (resident - shared) * PAGE_GB


class AnonymousPeak(threading.Thread):
    """The largest RssAnon seen since the last :meth:`reset` (sampled: a peak shorter than 20 ms can be missed)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.peak = anonymous_gb()

    def run(self) -> None:
        while True:
            with self.lock:
                self.peak = max(self.peak, anonymous_gb())
            time.sleep(0.02)


def release_memory() -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand glibc's freed heap back, so the next job's peak is its own


def main(jobs_file: str, results_file: str) -> int:
    spec = json.loads(Path(jobs_file).read_text())
    run.start_with_pack(Path(spec["comfyui"]), cpu=True, flags=spec.get("comfyui_flags", ""),
                        custom_nodes=spec.get("custom_nodes", []))
    results = {}
    anonymous = AnonymousPeak()
    anonymous.start()
    for name, arguments in spec["jobs"].items():
        release_memory()
        reset_peak_memory()
        anonymous.reset()
        started, cpu_started = time.monotonic(), time.process_time()
        try:
            runs = run.run_workflow(run.argument_parser().parse_args(arguments), report=lambda line: None)
            results[name] = {"runs": [[str(path) for path in saved] for saved in runs], "error": None}
        except Exception:  # noqa: BLE001  (reported per job; the next job still runs)
            results[name] = {"runs": [], "error": traceback.format_exc()}
        result = results[name]
        result |= {"seconds": round(time.monotonic() - started, 1),
                   "cpu_seconds": round(time.process_time() - cpu_started, 1),
                   "peak_gb": round(status_gb("VmHWM"), 2), "peak_anon_gb": round(anonymous.peak, 2)}
        print(f"{name}: {result['seconds']} s ({result['cpu_seconds']} CPU-s), peak {result['peak_gb']} GB "
              f"({result['peak_anon_gb']} GB not file-backed){'' if result['error'] is None else ', FAILED'}",
              file=sys.stderr, flush=True)
        Path(results_file).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
