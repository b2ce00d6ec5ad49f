"""Shared fixtures: a real ComfyUI (skipped where none is found) and the pack loaded into it."""

from __future__ import annotations

import pytest

from workflows import run as runner


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in-process (CPU) with this pack loaded by ComfyUI's own custom-node loader."""
    comfyui = runner.find_comfyui()
    if comfyui is None:
        pytest.skip("no ComfyUI found: set COMFYUI_PATH or put a ComfyUI checkout at ~/ComfyUI to run integration tests")
    comfy_nodes = runner.start_comfyui(comfyui, force_cpu=True)
    pack = runner.load_pack(comfy_nodes, tmp_path_factory.mktemp("custom_nodes"))

    class Comfy:
        path = comfyui
        nodes = comfy_nodes

    Comfy.pack = pack
    return Comfy


@pytest.fixture(scope="session")
def t1():
    """insightface's t1.jpg (RGB uint8) with the boxes and 5 keypoints of three of its faces (shared test data)."""
    from onnx_face_models import TESTDATA, load_t1

    loaded = load_t1()
    if loaded is None:
        pytest.skip(f"test data {TESTDATA / 't1_faces.npz'} not found")
    return loaded


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny models are bound by per-op overhead, and two threads on a
    busy 2-core machine made the tiny training UNet about 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
