"""Shipped workflows: each UI form is generated from its API form, and every API form runs headless in ComfyUI.

The runs use full-size random weights written in the published file formats (see official_files: ComfyUI
recognises an SD1.5 UNet only by its real shapes), through the README's headless command
(workflows/run.py), ComfyUI's own loaders and PromptExecutor, at 64x64 with 2 steps. They run one after the
other in this process, and ComfyUI's models are unloaded after each, so the peak is one workflow's models.
Face detection and recognition are stand-ins (tiny ONNX models that "find" the faces of t1.jpg), SMIRK is a
SMIRK-shaped encoder with random weights; MediaPipe is Google's real model from the test cache.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from comfy_browser import sample_photo
from PIL import Image

from official_files import official_models_dir
from onnx_face_models import insightface_images
from training_helpers import write_face_models, write_smirk_checkpoint
from workflows import convert, run

pytestmark = pytest.mark.comfyui
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.json"))
# Run here on the cached full-size Arc2Face stand-ins. The EmojiDiff and FaceCrafter workflows need other files
# (IP-Adapter, CLIP vision, FaceCrafter, EmoNet, SDXL): each is validated against ComfyUI's node definitions in
# tests/test_e_adapter_nodes.py and tests/test_facecrafter_workflows.py, and one of each family runs headless
# in tests/test_emojidiff_workflow_run.py and tests/test_facecrafter_workflows.py.
HEADLESS_HERE = [path for path in API_WORKFLOWS if not path.stem.startswith(("emojidiff_", "facecrafter_"))]
SIZE, STEPS = 64, 2
saved_by_workflow: dict[str, list[Path]] = {}  # each run's images, so that a later test need not run it again


def test_each_example_has_a_ui_form_and_thumbnail_in_the_template_folder_and_nothing_else():
    names = {path.stem for path in API_WORKFLOWS}
    assert names and {path.stem for path in WORKFLOWS.glob("*.json")} == names
    assert {path.stem for path in WORKFLOWS.glob("*.jpg")} == names
    assert not list(WORKFLOWS.glob("*_api.json"))  # ComfyUI would list them as templates that cannot open


def _inside(box, outer) -> bool:
    return outer[0] <= box[0] and outer[1] <= box[1] and box[0] + box[2] <= outer[0] + outer[2] \
        and box[1] + box[3] <= outer[1] + outer[3]


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("api_path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_layout_has_a_note_and_titled_stage_groups_that_hold_every_node_without_overlap(api_path):
    """The saved layout (the browser test checks it again with the sizes the frontend computes)."""
    ui = json.loads(convert.ui_path(api_path).read_text())
    boxes = {node["id"]: [node["pos"][0], node["pos"][1] - convert.TITLE_HEIGHT, node["size"][0],
                          node["size"][1] + convert.TITLE_HEIGHT] for node in ui["nodes"]}
    ids = sorted(boxes)
    assert not [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if _overlap(boxes[a], boxes[b])]
    groups = [group["bounding"] for group in ui["groups"]]
    assert {group["title"] for group in ui["groups"]} <= {title for title, _ in convert.STAGES.values()}
    assert not [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:] if _overlap(a, b)]
    [note] = [node for node in ui["nodes"] if node["type"] == "Note"]
    assert "models/" in note["widgets_values"][0]
    for node in ui["nodes"]:
        homes = [group for group in groups if _inside(boxes[node["id"]], group)]
        assert len(homes) == (0 if node is note else 1), node["title"]
    # left to right by dependency: every link runs from a column to one further right
    x = {node["id"]: node["pos"][0] for node in ui["nodes"]}
    assert all(x[origin] < x[target] for _, origin, _, target, _, _ in ui["links"])
    assert all(len(node["title"]) <= convert.MAX_TITLE for node in ui["nodes"])


@pytest.mark.parametrize("api_path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_form_is_generated_from_the_api_form(comfy, api_path):
    expected = convert.api_to_ui(json.loads(api_path.read_text()), comfy.nodes.NODE_CLASS_MAPPINGS)
    assert json.loads(convert.ui_path(api_path).read_text()) == expected, \
        f"regenerate with: python workflows/convert.py {api_path.relative_to(WORKFLOWS.parent)}"


def mediapipe_model() -> Path:
    cache = Path(os.environ.get("EXPRESSION_ADAPTERS_TEST_CACHE", Path.home() / ".cache" / "expression_adapters_tests"))
    return cache / "mediapipe" / "face_landmarker.task"


@pytest.fixture(scope="module")
def face_and_expression_models(tmp_path_factory):
    """insightface (stand-in antelopev2), smirk (stand-in) and mediapipe (the real model) in ComfyUI's layout."""
    root = tmp_path_factory.mktemp("workflow_models")
    if write_face_models(root / "insightface" / "models" / "antelopev2") is None:
        pytest.skip("shared test data (t1 face geometry) not found")
    (root / "smirk").mkdir()
    write_smirk_checkpoint(root / "smirk" / "SMIRK_em1.pt")
    (root / "mediapipe").mkdir()
    if mediapipe_model().is_file():
        (root / "mediapipe" / "face_landmarker.task").symlink_to(mediapipe_model())
    return root


def small(prompt: dict) -> list[str]:
    """--set overrides that make any workflow cheap: 64x64 latents and 2 sampling steps."""
    sets = []
    for node_id, node in prompt.items():
        if node["class_type"] == "EmptyLatentImage":
            sets += ["--set", f"{node_id}.width={SIZE}", "--set", f"{node_id}.height={SIZE}"]
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            sets += ["--set", f"{node_id}.steps={STEPS}"]
    return sets


def run_headless(output: Path, workflow: Path, *arguments, models=()) -> list[Path]:
    printed = io.StringIO()
    model_arguments = [argument for folder in (official_models_dir(), *models) for argument in ("--models", str(folder))]
    try:
        with contextlib.redirect_stdout(printed):
            assert run.main([str(workflow), *map(str, arguments), *model_arguments, "--output-dir", str(output), "--cpu"]) == 0
    finally:
        import comfy.model_management

        comfy.model_management.unload_all_models()  # the next workflow starts from an empty ComfyUI
        gc.collect()
    return [Path(line) for line in printed.getvalue().split()]


@pytest.fixture
def comfy_dirs(comfy, tmp_path):
    """ComfyUI's input, output and temp folders in tmp for one test (run.py copies --image files into the input folder)."""
    import folder_paths

    saved = folder_paths.get_input_directory(), folder_paths.get_temp_directory(), folder_paths.get_output_directory()
    for name in ("input", "temp", "output"):
        (tmp_path / name).mkdir()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    yield tmp_path
    folder_paths.set_input_directory(saved[0])
    folder_paths.set_temp_directory(saved[1])
    folder_paths.set_output_directory(saved[2])


@pytest.mark.parametrize("api_path", HEADLESS_HERE, ids=lambda p: p.stem)
def test_every_api_workflow_runs_headless(comfy_dirs, face_and_expression_models, api_path):
    prompt = json.loads(api_path.read_text())
    photos = [node_id for node_id, node in prompt.items() if node["class_type"] == "LoadImage"]
    uses_mediapipe = any(node["class_type"] == "ExpressionAdaptersLoadFaceLandmarker" for node in prompt.values())
    if uses_mediapipe and not mediapipe_model().is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"MediaPipe's face_landmarker.task is not in the test cache ({mediapipe_model()})")
        pytest.skip(f"MediaPipe's face_landmarker.task is not in the test cache ({mediapipe_model()})")
    # MediaPipe's short-range detector needs a face that fills the picture; the stand-in detector finds t1's faces.
    photo = sample_photo() if uses_mediapipe else insightface_images() / "t1.jpg"
    images = [argument for node_id in photos for argument in ("--image", f"{node_id}={photo}")]
    saved = run_headless(comfy_dirs / "output", api_path, *small(prompt), *images, "--seed", "7",
                         models=[face_and_expression_models])
    assert saved
    saved_by_workflow[api_path.stem] = saved
    batch = max(int(node["inputs"].get("batch_size", 1)) for node in prompt.values() if node["class_type"] == "EmptyLatentImage")
    assert len(saved) == batch
    for path in saved:
        image = np.asarray(Image.open(path))
        assert path.parent == comfy_dirs / "output" and image.shape == (SIZE, SIZE, 3) and image.std() > 0
    previews = {node["_meta"]["title"] for node in prompt.values() if node["class_type"] == "PreviewImage"}
    assert len(list((comfy_dirs / "temp").glob("*.png"))) >= len(previews)  # each preview showed something


def test_expression_workflow_shows_the_expression(comfy_dirs, tmp_path):
    """The same run as above (seed 7) with the Expression Adapter's strength at 0 gives another image."""
    workflow = WORKFLOWS / "api" / "arc2face_expression.json"
    arguments = [*small(json.loads(workflow.read_text())), "--seed", "7"]
    [with_expression] = saved_by_workflow.get(workflow.stem) or run_headless(tmp_path / "a", workflow, *arguments)
    [without] = run_headless(tmp_path / "b", workflow, *arguments, "--strength", "0")
    assert np.abs(np.asarray(Image.open(with_expression)).astype(int) - np.asarray(Image.open(without)).astype(int)).max() > 0
