"""Shipped workflows: the UI form matches the API form, and the API form runs headless in ComfyUI.

The run uses full-size random weights written in the published file formats (see official_files),
through the README's headless command (workflows/run.py), ComfyUI's own loaders and PromptExecutor.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from official_files import official_models_dir
from workflows import convert, run

pytestmark = pytest.mark.comfyui
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API_WORKFLOWS = sorted(WORKFLOWS.glob("*_api.json"))


@pytest.mark.parametrize("api_path", API_WORKFLOWS, ids=lambda p: p.name)
def test_ui_form_is_generated_from_the_api_form(comfy, api_path):
    expected = convert.api_to_ui(json.loads(api_path.read_text()), comfy.nodes.NODE_CLASS_MAPPINGS)
    assert json.loads(convert.ui_path(api_path).read_text()) == expected, \
        f"regenerate with: python workflows/convert.py {api_path.relative_to(WORKFLOWS.parent)}"


def run_headless(tmp_path, *arguments) -> list[Path]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run.main([*map(str, arguments), "--models", str(official_models_dir()), "--output-dir", str(tmp_path), "--cpu"]) == 0
    return [Path(line) for line in printed.getvalue().split()]


def test_expression_workflow_runs_headless_and_the_expression_shows(comfy, tmp_path):
    small = ["--set", "9.width=64", "--set", "9.height=64", "--set", "10.steps=2", "--seed", "7"]
    workflow = WORKFLOWS / "arc2face_expression_api.json"
    [with_expression] = run_headless(tmp_path / "a", workflow, *small)
    [without] = run_headless(tmp_path / "b", workflow, *small, "--strength", "0")
    image = np.asarray(Image.open(with_expression))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert np.abs(image.astype(int) - np.asarray(Image.open(without)).astype(int)).max() > 0
