"""The pack registers its nodes through V3's ``comfy_entrypoint`` with ComfyUI's own loader."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from workflows import run as runner

pytestmark = pytest.mark.comfyui
REPO = Path(__file__).resolve().parents[1]


def test_the_loader_registers_every_node_through_comfy_entrypoint(comfy):
    pack = comfy.pack
    assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
    assert getattr(pack, "NODE_CLASS_MAPPINGS", None) is None  # else ComfyUI's loader would skip the entry point
    extension = asyncio.run(pack.comfy_entrypoint())
    node_classes = asyncio.run(extension.get_node_list())
    assert node_classes and node_classes == list(pack.nodes.NODES)
    for node_class in node_classes:
        schema = node_class.GET_SCHEMA()
        assert comfy.nodes.NODE_CLASS_MAPPINGS[schema.node_id] is node_class
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] == schema.display_name
        assert node_class.RELATIVE_PYTHON_MODULE == f"custom_nodes.{runner.PACK_MODULE}"


def test_each_schema_is_built_once_at_load(comfy, tmp_path, monkeypatch):
    from comfy_api.latest import io

    owner = next(cls for cls in io.ComfyNode.__mro__ if "GET_SCHEMA" in vars(cls))
    original = vars(owner)["GET_SCHEMA"].__func__
    calls: dict[str, int] = {}

    def counting(cls):
        calls[cls.__name__] = calls.get(cls.__name__, 0) + 1
        return original(cls)

    monkeypatch.setattr(owner, "GET_SCHEMA", classmethod(counting))
    link = tmp_path / "expression_adapters_again"  # a fresh import under another module name
    link.symlink_to(REPO, target_is_directory=True)
    known = {node.GET_SCHEMA().node_id for node in comfy.pack.nodes.NODES}
    calls.clear()
    # ignore=: the second copy's classes must not replace the first's in ComfyUI's mappings
    assert asyncio.run(comfy.nodes.load_custom_node(str(link), ignore=known))
    fresh = sys.modules[str(link).replace(".", "_x_")]
    assert calls == {node.__name__: 1 for node in fresh.nodes.NODES}


def test_an_old_comfyui_gets_a_clear_log_line_and_no_nodes(tmp_path):
    old_api = tmp_path / "comfy_api"
    old_api.mkdir()
    (old_api / "__init__.py").write_text("")  # a ComfyUI from before the V3 node API: no comfy_api.latest
    script = ("import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('pack', {str(REPO / '__init__.py')!r})\n"
              "module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module\n"
              "spec.loader.exec_module(module)\n"
              "print(hasattr(module, 'comfy_entrypoint'), hasattr(module, 'NODE_CLASS_MAPPINGS'))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    assert "V3 node API" in result.stderr and "update ComfyUI" in result.stderr
