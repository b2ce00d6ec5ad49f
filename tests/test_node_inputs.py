"""What people type or pick in the nodes: tooltips on every input, loaders that list only their own kind of
file and say where a missing one comes from, numbers refused when NaN or absurd, messages counting from 1.

Runs in a real ComfyUI (the pack loaded by its own loader); the prompts go through ComfyUI's own
validation and executor (``workflows/run.py``), as an API client's would.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from workflows import run

pytestmark = pytest.mark.comfyui


def use_folders(patch, name: str, *paths) -> None:
    """Make ComfyUI's registered model folder ``name`` exactly ``paths`` (undone by ``patch``)."""
    import folder_paths

    extensions = folder_paths.folder_names_and_paths[name][1]
    patch.setitem(folder_paths.folder_names_and_paths, name, ([str(path) for path in paths], extensions))
    folder_paths.filename_list_cache.pop(name, None)


def registered_pack_nodes(comfy) -> dict:
    """The pack's nodes as ComfyUI registered them (through the V3 entry point, so no NODE_CLASS_MAPPINGS of ours)."""
    ours = set(comfy.pack.nodes.NODES)
    return {node_id: node for node_id, node in comfy.nodes.NODE_CLASS_MAPPINGS.items() if node in ours}


def test_every_input_of_every_registered_node_has_a_tooltip(comfy):
    """Widgets and sockets alike; new nodes are checked as soon as they are registered."""
    lacking = []
    registered = registered_pack_nodes(comfy)
    for node_id, node in registered.items():
        for spec in node.GET_SCHEMA().inputs:
            tooltip = getattr(spec, "tooltip", None)
            if not isinstance(tooltip, str) or len(tooltip.strip()) < 8:
                lacking.append(f"{node_id}.{spec.id}")
    assert len(registered) >= 47
    assert lacking == []


def _combo(node, name):
    spec = next(spec for spec in node.GET_SCHEMA().inputs if spec.id == name)
    return spec.options


def test_each_adapter_loader_lists_only_its_own_files_and_names_the_source_of_a_missing_one(comfy, tmp_path, monkeypatch):
    nodes = comfy.pack.nodes
    load_expression = nodes.expression_adapter_nodes.LoadExpressionAdapter
    load_reference = nodes.reference_nodes.LoadReferenceAdapter

    empty = tmp_path / "empty"
    empty.mkdir()
    use_folders(monkeypatch, "expression_adapters", empty)
    assert _combo(load_expression, "adapter_name") == ["exp_adapter.bin"]
    assert _combo(load_reference, "lora_name") == ["ref_adapter/pytorch_lora_weights.safetensors"]
    with pytest.raises(FileNotFoundError) as missing:
        load_expression.execute(adapter_name="exp_adapter.bin")
    message = str(missing.value)
    assert "FoivosPar/Arc2Face" in message and "exp_adapter/exp_adapter.bin" in message
    assert f"save it as {empty / 'exp_adapter.bin'}" in message
    with pytest.raises(FileNotFoundError, match=r"FoivosPar/Arc2Face.*save it as .*ref_adapter/pytorch_lora_weights"):
        load_reference.execute(lora_name="ref_adapter/pytorch_lora_weights.safetensors")

    folder = tmp_path / "expression_adapters"
    (folder / "ref_adapter").mkdir(parents=True)
    torch.save({"image_proj": {}, "ip_adapter": {}}, folder / "exp_adapter.bin")
    save_file({"image_proj.proj.weight": torch.zeros(2, 2), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)},
              folder / "trained_expression.safetensors")
    save_file({"unet.down.lora.down.weight": torch.zeros(2, 2)}, folder / "ref_adapter" / "pytorch_lora_weights.safetensors")
    save_file({"something.else": torch.zeros(2)}, folder / "unrelated.safetensors")
    use_folders(monkeypatch, "expression_adapters", folder)
    assert _combo(load_expression, "adapter_name") == ["exp_adapter.bin", "trained_expression.safetensors"]
    assert _combo(load_reference, "lora_name") == ["ref_adapter/pytorch_lora_weights.safetensors"]


def _execute_error(prompt: dict) -> str:
    with pytest.raises(RuntimeError) as failure:
        run.execute(prompt)
    return str(failure.value)


def _flame_chart_prompt(json_values: str = "", **sliders) -> dict:
    return {
        "1": {"class_type": "ExpressionAdaptersFlameExpression",
              "inputs": {"json_values": json_values, "jaw_open": 0.0, "eyelid_left": 0.0, "eyelid_right": 0.0,
                         **{f"expression_{i}": 0.0 for i in range(1, 6)}, **sliders}},
        "2": {"class_type": "ExpressionAdaptersFlameChart",
              "inputs": {"expression": ["1", 0], "width": 300, "height": 120, "limit": 0.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def test_nan_and_absurd_values_sent_through_the_api_are_refused_with_a_clear_message(comfy):
    prompt = json.loads(json.dumps(_flame_chart_prompt(jaw_open=float("nan"))))  # Python's JSON reads NaN, as ComfyUI's server does
    assert math.isnan(prompt["1"]["inputs"]["jaw_open"])
    assert "FLAME Expression: jaw_open must be a finite number between 0 and 0.5; got nan" in _execute_error(prompt)

    absurd = json.dumps([1e30] + [0.0] * 54)
    message = _execute_error(_flame_chart_prompt(absurd))
    assert "values beyond +-50 in row 1 (counting from 1; largest 1e+30)" in message

    emotion = {
        "1": {"class_type": "ExpressionAdaptersEmotion",
              "inputs": {"mode": "class", "emotion": "Happy", "intensity": 1.0, "valence": float("nan"), "arousal": 0.0}},
        "2": {"class_type": "ExpressionAdaptersEmotionChart", "inputs": {"emotion": ["1", 0], "width": 256, "height": 120}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    assert "Emotion (manual): valence must be a finite number between -1 and 1; got nan" in _execute_error(emotion)

    ordinary = _flame_chart_prompt(json.dumps([0.5] * 55), jaw_open=0.2)
    assert set(run.execute(ordinary)) == {"3"}  # the same graph with ordinary values runs


def test_strengths_are_refused_before_any_model_is_touched(comfy):
    nodes = comfy.pack.nodes
    apply_expression = nodes.expression_adapter_nodes.ApplyExpressionAdapter
    with pytest.raises(ValueError, match=r"Apply Expression Adapter: strength must be a finite number between 0 and 3; got nan"):
        apply_expression.execute(model=None, expression_adapter=None, expression=None, strength=float("nan"),
                                 start_at=0.0, end_at=1.0)
    with pytest.raises(ValueError, match=r"Apply Expression Adapter: end_at must lie between 0 and 1; got 7"):
        apply_expression.execute(model=None, expression_adapter=None, expression=None, strength=1.0, start_at=0.0, end_at=7)
    apply_reference = nodes.reference_nodes.ApplyReferenceAdapter
    with pytest.raises(ValueError, match=r"Apply Reference Adapter: lora_strength must be a finite number"):
        apply_reference.execute(model=None, reference_adapter=None, vae=None, reference_image=None, id_conditioning=None,
                                lora_strength=float("-inf"))


def test_every_number_input_of_every_node_refuses_nan_through_the_shared_check(comfy):
    from comfy_api.latest import io

    check_numbers = comfy.pack.nodes.validation.check_numbers
    checked = 0
    for node in registered_pack_nodes(comfy).values():
        schema = node.GET_SCHEMA()
        for spec in schema.inputs:
            if isinstance(spec, (io.Float.Input, io.Int.Input)):
                with pytest.raises(ValueError, match=re.escape(f"{schema.display_name}: {spec.id} must be a finite number")):
                    check_numbers(node, **{spec.id: float("nan")})
                checked += 1
    assert checked > 100


def test_a_json_object_of_the_wrong_kind_says_what_format_is_expected(comfy):
    node = comfy.pack.nodes.expression_adapter_nodes.FlameExpressionNode
    sliders = {"jaw_open": 0.0, "eyelid_left": 0.0, "eyelid_right": 0.0, **{f"expression_{i}": 0.0 for i in range(1, 6)}}
    with pytest.raises(ValueError) as error:
        node.execute(json_values='{"jaw": 0.3}', **sliders)
    message = str(error.value)
    assert "got an object with keys ['jaw']" in message
    assert "Expected a JSON list of 55 numbers (one row, e.g. [0.8, -0.3, 0.0, ...] with 55 numbers)" in message
    assert '{"kind": "flame_expression", "values": [...]}' in message
