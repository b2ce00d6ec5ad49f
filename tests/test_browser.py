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

Every test runs against two frontends: the one ComfyUI's requirements pin (1.27.10 for ComfyUI 0.3.64) and the newer
build that ``.ci/run`` fetches from PyPI (``comfyui-frontend-package`` 1.58.1, unzipped into the folder that
``EXPRESSION_ADAPTERS_FRONTEND`` names), which the server serves with ``--front-end-root``; the page must report the
version expected.

Console errors while the page starts (``user.css`` and empty user-data 404s, the release check that
cannot reach the internet) come from the stock ComfyUI frontend on a fresh user folder, not from this
pack; the test records console errors from the moment a workflow is loaded.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from support.comfy_browser import PACK_FOLDER, ComfyServer, Frontend, chromium_path
from support.pack_snapshots import extract, other_pack_nodes, packs_for
from support.workflow_checks import problems
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
FRONTEND_PACKAGE = "comfyui-frontend-package"
# Widgets a frontend adds to ComfyUI's own nodes for display only; the server declares no such input and never
# reads it. graphToPrompt() of 1.27.10 gives PreviewAny's text box as "preview": "", that of 1.58.1 leaves it out.
DISPLAY_ONLY = {("PreviewAny", "preview")}


def frontend_build(which: str) -> tuple[str, Path | None]:
    """The version of the ``pinned`` frontend or the ``newest`` one, and the static folder to serve (None: the
    server's own)."""
    if which == "pinned":
        return importlib.metadata.version(FRONTEND_PACKAGE), None
    folder = os.environ.get("EXPRESSION_ADAPTERS_FRONTEND")
    if not folder:
        _unavailable("EXPRESSION_ADAPTERS_FRONTEND is unset: it names the unzipped comfyui-frontend-package wheel of "
                     "the newer frontend (.ci/run fetches 1.58.1 from PyPI)")
    wheel = next(iter(importlib.metadata.distributions(name=FRONTEND_PACKAGE, path=[folder])), None)
    if wheel is None:
        _unavailable(f"EXPRESSION_ADAPTERS_FRONTEND={folder} holds no unzipped {FRONTEND_PACKAGE} wheel")
    return wheel.version, Path(folder) / "comfyui_frontend_package" / "static"


def without_display_only(prompt: dict, object_info: dict) -> dict:
    """``prompt`` less the DISPLAY_ONLY widgets of ComfyUI's own nodes, after checking the server declares none."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for class_type, name in DISPLAY_ONLY:
            if node["class_type"] == class_type:
                declared = object_info[class_type]["input"]
                assert name not in {**declared.get("required", {}), **declared.get("optional", {})}
                node["inputs"].pop(name, None)
    return prompt


def assert_gives_api_form(frontend, name: str) -> None:
    """graphToPrompt() is exactly the shipped API form, but for DISPLAY_ONLY widgets, which frontends differ on."""
    object_info = frontend.server.object_info
    assert without_display_only(frontend.graph_to_prompt(), object_info) == without_display_only(api_form(name),
                                                                                                 object_info)


@pytest.fixture(scope="module", params=["pinned", "newest"])
def frontend(request, tmp_path_factory):
    comfyui, executable = comfyui_and_chromium()
    version, front_end_root = frontend_build(request.param)
    base = tmp_path_factory.mktemp("comfyui_base")
    packs_folder = tmp_path_factory.mktemp("other_packs")
    packs = [extract(tarball, packs_folder) for tarball in sorted({tarball for name in WITH_OTHER_PACKS
                                                                   for tarball in packs_for(api_form(name))})]
    with ComfyServer(comfyui, base, input_files=workflow_input_files(), model_files=workflow_model_files(),
                     custom_nodes=packs, front_end_root=front_end_root) as server, Frontend(server, executable) as page:
        assert page.version() == version
        yield page


@pytest.fixture(scope="module")
def frontend_without_other_packs(frontend, tmp_path_factory):
    """A second server with only this pack in custom_nodes (a user who has not installed the other packs), in a
    page of ``frontend``'s browser."""
    base = tmp_path_factory.mktemp("comfyui_base_without_other_packs")
    with ComfyServer(frontend.server.comfyui, base, input_files=workflow_input_files(),
                     model_files=workflow_model_files(), front_end_root=frontend.server.front_end_root) as server, \
            Frontend(server, frontend.executable, browser=frontend.browser) as page:
        assert page.version() == frontend.version()
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
    assert frontend.issues() == [], "issues found on load (missing nodes, models or inputs?)"
    assert frontend.error_toasts() == []
    assert frontend.console_errors == []

    boxes = frontend.node_boxes()
    assert len(boxes) == len(workflow["nodes"])
    for i, a in enumerate(boxes):
        assert a["titleWidth"] + 2 * a["titleHeight"] <= a["size"][0], f"title of {a['title']!r} is cut"
        for b in boxes[i + 1:]:
            assert not overlaps(a["box"], b["box"]), f"{a['title']!r} {a['box']} overlaps {b['title']!r} {b['box']}"

    assert_gives_api_form(frontend, name)

    frontend.screenshot(ARTIFACTS / f"{name}.png", clip=frontend.fit_view())


# Workflows saved before our socket types took the EXPR_ prefix (nodes/types.py): these three hold every type.
OLD_FORM_WORKFLOWS = ["arc2face_reference", "emojidiff_compare", "facecrafter_animation"]


def with_old_type_names(workflow: dict) -> dict:
    """``workflow`` as it was saved before the rename: our types without EXPR_, and our landmark inputs typed
    with our own type alone (they take core's FACE_LANDMARKS as well now)."""
    text = re.sub(r'"EXPR_([A-Z0-9_]+)(,FACE_LANDMARKS)?"', r'"\1"', json.dumps(workflow))
    return json.loads(text)


def test_the_old_form_workflows_hold_every_renamed_type():
    ours = set(re.findall(r'io\.Custom\("(EXPR_[A-Z0-9_]+)"\)', (WORKFLOWS.parent / "nodes" / "types.py").read_text()))
    held = {t for name in OLD_FORM_WORKFLOWS for t in re.findall(r'"(EXPR_[A-Z0-9_]+)', (WORKFLOWS / f"{name}.json").read_text())}
    assert len(ours) == 14 and held == ours


@pytest.mark.parametrize("name", OLD_FORM_WORKFLOWS)
def test_a_workflow_saved_with_the_old_type_names_loads_and_gives_its_api_form(frontend, name):
    old = with_old_type_names(json.loads((WORKFLOWS / f"{name}.json").read_text()))
    assert "EXPR_" not in json.dumps(old)
    frontend.load_workflow(old, name)
    assert frontend.dialogs() == [] and frontend.issues() == [] and frontend.error_toasts() == []
    assert_gives_api_form(frontend, name)
    # the frontend takes each socket's type from the node definitions, so new links get the new types
    slot_types = frontend.page.evaluate(
        "() => window.app.graph._nodes.flatMap(n => [...(n.inputs || []), ...(n.outputs || [])].map(s => s.type))")
    assert "EXPR_FACE_ANALYZER" in slot_types and "FACE_ANALYZER" not in slot_types


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_workflow_fits_comfyuis_node_definitions(frontend, name):
    """Against ComfyUI's own /object_info: node types, widget values, link types."""
    assert problems(json.loads((WORKFLOWS / f"{name}.json").read_text()), frontend.server.object_info) == []


def test_templates_browser_lists_each_example_once_with_a_thumbnail_and_opens_it(frontend):
    from playwright.sync_api import expect

    server = frontend.server
    assert sorted(server.get_json("/workflow_templates")[PACK_FOLDER]) == UI_WORKFLOWS
    page = frontend.page
    for name in UI_WORKFLOWS:
        url = f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg" and len(response.read()) > 1000

        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        # the dialog around the templates: its category list is inside the content in 1.27.10, beside it in 1.58.1
        content = page.locator("[data-testid='template-workflows-content']")
        content.wait_for(timeout=30_000)
        dialog = page.get_by_role("dialog").filter(has=content)
        dialog.get_by_text(PACK_FOLDER, exact=True).first.click()
        cards = dialog.locator("[data-testid^='template-workflow-']")
        expect(cards).to_have_count(len(UI_WORKFLOWS), timeout=30_000)  # our category alone, each example once
        assert sorted(cards.evaluate_all("cards => cards.map(card => card.dataset.testid)")) == \
            [f"template-workflow-{each}" for each in UI_WORKFLOWS]
        card = dialog.locator(f"[data-testid='template-workflow-{name}']")
        thumbnail = card.locator(f"img[alt='{name}']")
        thumbnail.wait_for(timeout=30_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
        frontend.console_errors.clear()
        card.click()
        page.wait_for_function("n => window.app.graph.nodes.length === n",
                               arg=len(json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]), timeout=30_000)
        frontend.settle()
        assert frontend.error_toasts() == [] and frontend.console_errors == []
        assert_gives_api_form(frontend, name)
        frontend.close_dialogs()


@pytest.mark.parametrize("name", WITH_OTHER_PACKS)
def test_without_the_other_pack_comfyuis_missing_node_dialog_names_its_nodes(frontend_without_other_packs, name):
    """What a user without the pack sees on opening the example: ComfyUI's own "Some Nodes Are Missing" dialog
    (1.27.10), or its "issues found" overlay whose details list "Missing Node Packs" (1.58.1), naming each node
    type of the other pack the workflow uses, and none of this pack's or ComfyUI's."""
    page = frontend_without_other_packs
    page.load_workflow(json.loads((WORKFLOWS / f"{name}.json").read_text()), name)
    dialogs, issues = page.dialogs(), page.issues()
    if page.server.front_end_root is None:  # the pinned frontend
        assert issues == [] and len(dialogs) == 1 and "Some Nodes Are Missing" in dialogs[0], dialogs
        report = dialogs[0]
    else:
        assert dialogs == [] and len(issues) == 1, (dialogs, issues)
        report = page.issue_details("missing-node")
        assert "Missing Node Packs" in report
    page.close_dialogs()
    prompt = api_form(name)
    missing = other_pack_nodes(prompt)
    assert missing
    listed = {node["class_type"] for node in prompt.values() if node["class_type"] in report}
    assert listed == missing, report
