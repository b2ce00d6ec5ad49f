"""Shared fixtures: a real ComfyUI (skipped where none is found) and the pack loaded into it."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflows import run as runner

SHARED_TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


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
