"""Shipped workflows: each UI form is generated from its API form, and every API form runs headless in ComfyUI.

The runs go through the README's headless code (workflows/run.py: ComfyUI's own loaders and
PromptExecutor) on full-size random weights written in the published file formats (workflow_models:
ComfyUI recognises SD1.5 and SDXL models only by their real shapes), at 64x64 with 2 steps. They run
one after another in one ComfyUI process of their own (workflow_jobs.py), so their models never sit in
the test process, and each workflow's peak memory is measured. The session starts them in the background
(support.workflow_runs) and the tests here read their results. SDXL's weights are kept in bf16
(ComfyUI's --bf16-unet --bf16-text-enc; the CPU still computes in fp32). Face detection and
recognition are stand-ins (ONNX models that "find" the faces of t1.jpg), SMIRK and EmoNet are
stand-ins of the published layouts, MediaPipe is Google's real model from the test cache.

A workflow with another pack's nodes (emojidiff_sdxl_instantid: InstantID) runs with that pack's snapshot
(``pack_snapshots``) extracted into a throw-away custom_nodes folder and loaded by ComfyUI's own loader
(run.py's --custom-nodes), in a ComfyUI process of its own whose --base-directory holds insightface's antelopev2
for InstantID's face analysis (it reads ComfyUI's own models folder, not folder_paths: see workflow_models).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.pack_snapshots import NODE_TYPES, extract, packs_for
from support.workflow_runs import (
    API_WORKFLOWS,
    DEFAULT_PEAK_GB,
    INSTANTID_WORKFLOW,
    PEAK_GB,
    SIZE,
    VIDEO_FRAMES,
    WITH_STRENGTHS,
    WORKFLOWS,
    BackgroundRuns,
    load,
    variants,
)
from workflows import convert

pytestmark = pytest.mark.comfyui


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


@pytest.fixture(scope="module")
def other_packs(comfy, tmp_path_factory):
    """The other packs the shipped workflows use, in the test's ComfyUI (loaded as ComfyUI loads custom nodes, unless
    an earlier test module loaded them)."""
    folder = tmp_path_factory.mktemp("custom_nodes")
    for tarball in sorted({tarball for path in API_WORKFLOWS for tarball in packs_for(load(path))}):
        if not NODE_TYPES[tarball] <= set(comfy.nodes.NODE_CLASS_MAPPINGS):
            pack = extract(tarball, folder)
            assert asyncio.run(comfy.nodes.load_custom_node(str(pack))), f"ComfyUI could not load {pack.name}"


@pytest.mark.parametrize("api_path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_ui_form_is_up_to_date_with_its_api_form_and_the_node_definitions(comfy, other_packs, api_path):
    """A freshness check: the committed UI form equals what workflows/convert.py writes today."""
    expected = convert.api_to_ui(json.loads(api_path.read_text()), comfy.nodes.NODE_CLASS_MAPPINGS)
    assert json.loads(convert.ui_path(api_path).read_text()) == expected, \
        f"regenerate with: python workflows/convert.py {api_path.relative_to(WORKFLOWS.parent)}"


@pytest.fixture(scope="module")
def headless(comfy, mediapipe_task, workflow_runs, tmp_path_factory):
    """Every API workflow run headless (and again with this pack's strengths at 0): ``{name: result}``, see
    support.workflow_runs; started at the session's start (conftest's ``workflow_runs``), or now."""
    runs = workflow_runs or BackgroundRuns.start(tmp_path_factory.mktemp("workflow_runs"), comfy.path, mediapipe_task)
    return runs.root, runs.results()


def images(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)).astype(int) for path in paths]


@pytest.mark.full_size
@pytest.mark.parametrize("api_path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_every_api_workflow_runs_headless(headless, api_path):
    root, results = headless
    result = results[api_path.stem]
    assert result["error"] is None, result["error"]
    prompt = load(api_path)
    saved = [Path(path) for path in result["runs"][0]]
    batches = [int(node["inputs"].get("batch_size", 1)) for node in prompt.values() if node["class_type"] == "EmptyLatentImage"]
    video = any(node["class_type"] == "LoadVideo" for node in prompt.values())
    savers = sum(node["class_type"] == "SaveImage" for node in prompt.values())
    assert len(saved) == (VIDEO_FRAMES if video else max(batches)) * savers
    for path, image in zip(saved, images(saved)):
        assert path.parent == root / api_path.stem / "output"
        # emojidiff_compare saves its two results side by side
        # a picture, not a flat or black frame (the stand-in models' pictures have a spread of about 48 levels)
        assert image.shape[0] == SIZE and image.shape[1] in (SIZE, 2 * SIZE) and image.shape[2] == 3 and image.std() > 10
    previews = {node["_meta"]["title"] for node in prompt.values() if node["class_type"] == "PreviewImage"}
    assert len(list((root / api_path.stem / "temp").glob("*.png"))) >= len(previews)  # each preview showed something


@pytest.mark.full_size
@pytest.mark.parametrize("api_path", WITH_STRENGTHS, ids=lambda p: p.stem)
def test_each_workflows_adapters_change_its_picture(headless, api_path):
    """The same run (seed 7) with every strength of this pack's nodes at 0 gives other pictures."""
    runs = runs_by_name(headless, api_path)
    with_adapters, without = runs["workflow"], runs["strengths off"]
    assert len(with_adapters) == len(without)
    assert smallest_mean_difference(with_adapters, without) > MOVED


def runs_by_name(headless, api_path: Path) -> dict[str, list]:
    """Each run's saved pictures: "workflow" (its own run) and one entry per variant (``variants``)."""
    _, results = headless
    result = results[api_path.stem]
    assert result["error"] is None, result["error"]
    names = ["workflow", *variants(api_path)]
    assert len(result["runs"]) == len(names)
    return dict(zip(names, result["runs"]))


def largest_difference(first: list, second: list) -> int:
    return max(np.abs(a - b).max() for a, b in zip(images(first), images(second), strict=True))


# An adapter that acts moves every picture by more than this many levels (of 255) on average: measured on the
# stand-in models, the smallest mean change of any picture was 3.2 (most are 5 to 38); a change of a few pixels
# or a rounding difference stays far below.
MOVED = 1.0


def smallest_mean_difference(first: list, second: list) -> float:
    return min(float(np.abs(a - b).mean()) for a, b in zip(images(first), images(second), strict=True))


@pytest.mark.full_size
def test_instantid_and_the_e_adapter_expression_both_act_in_emojidiff_sdxl_instantid(headless):
    """InstantID Patch Attention (identity), then Apply E-Adapter (expression) on one SDXL model. InstantID's weight at
    0 changes the picture, and so does the E-Adapter's expression strength at 0: each acts with the other on the
    model (ours calls the InstantID patch it finds at each layer). The E-Adapter acts only through its expression:
    its expression strength alone at 0 gives exactly the picture of all its strengths at 0 (no ID embedding is
    connected, the FaceID LoRA is at 0)."""
    runs = runs_by_name(headless, INSTANTID_WORKFLOW)
    assert smallest_mean_difference(runs["workflow"], runs["InstantID off"]) > MOVED
    assert smallest_mean_difference(runs["workflow"], runs["expression off"]) > MOVED
    assert smallest_mean_difference(runs["InstantID off"], runs["expression off"]) > MOVED
    assert largest_difference(runs["expression off"], runs["strengths off"]) == 0


@pytest.mark.full_size
def test_each_workflow_run_holds_at_most_8_gb_sdxl_16(headless):
    """Memory the run needs (model files read through mmap also count in its resident size, but the kernel can drop them)."""
    _, results = headless
    peaks = {name: result["peak_anon_gb"] for name, result in results.items()}
    assert all(peak is not None and peak < PEAK_GB.get(name, DEFAULT_PEAK_GB) for name, peak in peaks.items()), peaks
