"""The pack as a person meets it: a real ComfyUI server and its own frontend in headless Chromium.

For every UI workflow: it loads without a missing-node dialog, error toast or console error; no two
nodes' boxes overlap (sizes as the frontend computes them) and no title is cut; ``graphToPrompt()``
gives exactly the workflow's API form; a screenshot is saved as a test artefact (in
``$EXPRESSION_ADAPTERS_TEST_ARTIFACTS/browser``, default ``test-artifacts/browser``; ``workflows/thumbnails.py``
turns them into the template thumbnails and the README's pictures). The Templates browser lists each
example once, with its thumbnail, and each opens. The server has the other packs an example uses
(``pack_snapshots``: InstantID for emojidiff_sdxl_instantid) in its custom_nodes, as their users have; a second
server without them shows what a user without such a pack sees: ComfyUI's own missing-node dialog, naming the
pack's nodes.

Console errors while the page starts (``user.css`` and empty user-data 404s, the release check that
cannot reach the internet) come from the stock ComfyUI frontend on a fresh user folder, not from this
pack; the test records console errors from the moment a workflow is loaded.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from workflow_checks import problems

from comfy_browser import PACK_FOLDER, ComfyServer, Frontend, chromium_path
from pack_snapshots import extract, other_pack_nodes, packs_for
from workflows import convert, run

pytestmark = pytest.mark.comfyui
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
UI_WORKFLOWS = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
ARTIFACTS = Path(os.environ.get("EXPRESSION_ADAPTERS_TEST_ARTIFACTS", WORKFLOWS.parent / "test-artifacts")) / "browser"


def _unavailable(reason: str):
    """Outside CI a missing browser or ComfyUI skips, saying why; under CI=true it fails."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run; .ci/run installs what it needs)")
    pytest.skip(reason)


def comfyui_and_chromium():
    comfyui = run.find_comfyui()
    if comfyui is None:
        _unavailable("no ComfyUI found: set COMFYUI_PATH")
    executable = chromium_path()
    if executable is None:
        _unavailable("no Chromium found (apt-get install chromium, or set CHROMIUM_PATH)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright; its own browser download is not needed)")
    return comfyui, executable


def api_form(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


WITH_OTHER_PACKS = [name for name in UI_WORKFLOWS if packs_for(api_form(name))]


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    comfyui, executable = comfyui_and_chromium()
    base = tmp_path_factory.mktemp("comfyui_base")
    packs_folder = tmp_path_factory.mktemp("other_packs")
    packs = [extract(tarball, packs_folder) for tarball in sorted({tarball for name in WITH_OTHER_PACKS
                                                                   for tarball in packs_for(api_form(name))})]
    with ComfyServer(comfyui, base, input_files=workflow_input_files(), model_files=workflow_model_files(),
                     custom_nodes=packs) as server, Frontend(server, executable) as page:
        yield page


@pytest.fixture(scope="module")
def frontend_without_other_packs(frontend, tmp_path_factory):
    """A second server with only this pack in custom_nodes (a user who has not installed the other packs), in a
    page of ``frontend``'s browser."""
    base = tmp_path_factory.mktemp("comfyui_base_without_other_packs")
    with ComfyServer(frontend.server.comfyui, base, input_files=workflow_input_files(),
                     model_files=workflow_model_files()) as server, \
            Frontend(server, frontend.executable, browser=frontend.browser) as page:
        yield page


def workflow_input_files() -> list[str]:
    """The photos and videos the examples read from ComfyUI/input."""
    return sorted({node["inputs"][name] for path in (WORKFLOWS / "api").glob("*.json")
                   for node in json.loads(path.read_text()).values()
                   for (class_type, name), folder in convert.FILE_INPUTS.items()
                   if folder == "input" and node["class_type"] == class_type})


def workflow_model_files() -> list[str]:
    """The model files the examples name, relative to ComfyUI/models (a folder name stands for its files)."""
    files = set()
    for path in (WORKFLOWS / "api").glob("*.json"):
        for node in json.loads(path.read_text()).values():
            for (class_type, name), folder in convert.FILE_INPUTS.items():
                value = node["inputs"].get(name)
                if node["class_type"] == class_type and folder.startswith("models/") and isinstance(value, str) \
                        and value != convert.NO_FILE:
                    if node["class_type"] == "ExpressionAdaptersLoadArc2FaceIDEncoder":
                        files |= {f"arc2face/{value}/config.json", f"arc2face/{value}/pytorch_model.bin"}
                    else:
                        files.add(f"{folder.removeprefix('models/')}/{value}")
    return sorted(files)


def overlaps(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_workflow_loads_readably_and_gives_its_api_form(frontend, name):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    frontend.load_workflow(workflow, name)
    assert frontend.dialogs() == [], "a dialog opened on load (missing nodes?)"
    assert frontend.error_toasts() == []
    assert frontend.console_errors == []

    boxes = frontend.node_boxes()
    assert len(boxes) == len(workflow["nodes"])
    for i, a in enumerate(boxes):
        assert a["titleWidth"] + 2 * a["titleHeight"] <= a["size"][0], f"title of {a['title']!r} is cut"
        for b in boxes[i + 1:]:
            assert not overlaps(a["box"], b["box"]), f"{a['title']!r} {a['box']} overlaps {b['title']!r} {b['box']}"

    expected = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert frontend.graph_to_prompt() == expected

    frontend.screenshot(ARTIFACTS / f"{name}.png", clip=frontend.fit_view())


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_workflow_fits_comfyuis_node_definitions(frontend, name):
    """Against ComfyUI's own /object_info: node types, widget values, link types."""
    assert problems(json.loads((WORKFLOWS / f"{name}.json").read_text()), frontend.server.object_info) == []


def test_templates_browser_lists_each_example_once_with_a_thumbnail_and_opens_it(frontend):
    server = frontend.server
    assert sorted(server.get_json("/workflow_templates")[PACK_FOLDER]) == UI_WORKFLOWS
    page = frontend.page
    for name in UI_WORKFLOWS:
        url = f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg" and len(response.read()) > 1000

        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        dialog = page.locator("[data-testid='template-workflows-content']")
        dialog.wait_for(timeout=30_000)
        dialog.get_by_text(PACK_FOLDER, exact=True).first.click()
        card = dialog.locator(f"[data-testid='template-workflow-{name}']")
        thumbnail = card.locator(f"img[alt='{name}']")
        thumbnail.wait_for(timeout=30_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
        frontend.console_errors.clear()
        card.click()
        page.wait_for_function("n => window.app.graph.nodes.length === n",
                               arg=len(json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]), timeout=30_000)
        page.wait_for_timeout(500)
        assert frontend.error_toasts() == [] and frontend.console_errors == []
        assert frontend.graph_to_prompt() == json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
        frontend.close_dialogs()


@pytest.mark.parametrize("name", WITH_OTHER_PACKS)
def test_without_the_other_pack_comfyuis_missing_node_dialog_names_its_nodes(frontend_without_other_packs, name):
    """What a user without the pack sees on opening the example: ComfyUI's own "Some Nodes Are Missing" dialog,
    listing each node type of the other pack the workflow uses, and none of this pack's or ComfyUI's."""
    page = frontend_without_other_packs
    page.load_workflow(json.loads((WORKFLOWS / f"{name}.json").read_text()), name)
    dialogs = page.dialogs()
    page.close_dialogs()
    assert len(dialogs) == 1 and "Some Nodes Are Missing" in dialogs[0], dialogs
    prompt = api_form(name)
    missing = other_pack_nodes(prompt)
    assert missing
    listed = {node["class_type"] for node in prompt.values() if node["class_type"] in dialogs[0]}
    assert listed == missing, dialogs[0]
