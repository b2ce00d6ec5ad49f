"""Write the drag-and-drop (UI) form of each API-format workflow, laid out as a person would, so the two never drift.

    python workflows/convert.py --all            # every workflow: move old workflows/NAME_api.json to
                                                 # workflows/api/NAME.json, then write workflows/NAME.json
    python workflows/convert.py workflows/api/arc2face_expression.json   # one workflow
    python workflows/convert.py --all --custom-nodes ~/ComfyUI/custom_nodes/ComfyUI_InstantID   # with other packs'
                                                 # nodes (emojidiff_sdxl_instantid uses InstantID's)

The API form (``workflows/api/NAME.json``) is the source; the UI form (``workflows/NAME.json``) is generated.
ComfyUI publishes the ``*.json`` directly inside a pack's ``workflows`` folder as templates (its
``/workflow_templates`` route globs ``workflows/*.json``), so only UI forms live there, each with a thumbnail
``NAME.jpg`` beside it (``workflows/thumbnails.py``); the API forms live one folder down, where it does not look.

Layout: one titled group per stage (identity, expression, model, sampling), stacked top to bottom; inside
each, nodes go left to right by dependency depth (a column per depth, shared by all groups) and stack
without overlapping. Node sizes are computed from each node's sockets and widgets the way ComfyUI's
frontend does (with room for image previews), widths from the title. A Note at the top says which files
go where. Node input order and socket types come from the node classes of a running ComfyUI (this pack
included), found as ``workflows/run.py`` finds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent
API_FOLDER = WORKFLOWS / "api"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The frontend's measures (LiteGraph): title bar, slot row, widget row (+4 spacing), text size.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT = 30, 20, 24
TITLE_CHAR_WIDTH = 7.5  # a generous average for the frontend's 14 px title font
MIN_WIDTH, MULTILINE_HEIGHT, PREVIEW_HEIGHT = 320, 110, 260
COLUMN_GAP, ROW_GAP, GROUP_PADDING, GROUP_TITLE = 70, 50, 20, 64
MAX_TITLE = 34  # longer titles are cut by the frontend at ordinary widths; keep them short
VIEWPORT = (1600, 1000)  # the view saved with the workflow frames the whole graph in a window this size

STAGES = {
    "identity": ("1. Identity (who)", "#3f789e"),
    "expression": ("2. Expression (which face)", "#8A8"),
    "model": ("3. Model and adapters", "#b06634"),
    "sampling": ("4. Sampling", "#b58b2a"),
}
# Nodes whose stage the rules below cannot tell; a node not named here follows its category.
STAGE_OF_TYPE = {
    "UNETLoader": "model", "CLIPLoader": "model", "VAELoader": "model", "CheckpointLoaderSimple": "model",
    "LoraLoader": "model", "LoraLoaderModelOnly": "model", "CLIPVisionLoader": "model",
    "CLIPTextEncode": "identity",
}
STAGE_OF_CATEGORY = (  # first match of a substring of the node's category
    ("/identity", "identity"), ("/expression", "expression"), ("/edit", "expression"), ("/animate", "expression"),
    ("/presets", "expression"), ("/previews", "expression"), ("/apply", "model"),
    ("sampling", "sampling"), ("latent", "sampling"),
    ("InstantID", "identity"),  # cubiq's ComfyUI_InstantID: each of its nodes is about the identity
)
# Nodes that sit with their neighbours: loaders of the pack (identity, expression or model), image inputs
# and previews. They take the stage of the node they feed, else of the node feeding them.
FOLLOWERS = {"LoadImage", "PreviewImage", "SaveImage"}
# Extra body height of nodes that display something: image previews, and PreviewAny's text box.
IMAGE_NODES = {"LoadImage": 310, "PreviewImage": PREVIEW_HEIGHT, "SaveImage": PREVIEW_HEIGHT, "PreviewAny": 90}

# Where the files a workflow names go, for the Note: (node type, input) -> folder under ComfyUI/.
FILE_INPUTS = {
    ("UNETLoader", "unet_name"): "models/diffusion_models",
    ("CLIPLoader", "clip_name"): "models/text_encoders",
    ("VAELoader", "vae_name"): "models/vae",
    ("CheckpointLoaderSimple", "ckpt_name"): "models/checkpoints",
    ("CLIPVisionLoader", "clip_name"): "models/clip_vision",
    ("LoraLoader", "lora_name"): "models/loras",
    ("LoadImage", "image"): "input",
    ("ExpressionAdaptersLoadExpressionAdapter", "adapter_name"): "models/expression_adapters",
    ("ExpressionAdaptersLoadReferenceAdapter", "lora_name"): "models/expression_adapters",
    ("ExpressionAdaptersLoadArc2FaceIDEncoder", "encoder_name"): "models/arc2face",
    ("ExpressionAdaptersLoadSmirkEncoder", "model_name"): "models/smirk",
    ("ExpressionAdaptersLoadFaceLandmarker", "model_name"): "models/mediapipe",
    ("ExpressionAdaptersLoadEmoNet", "model_name"): "models/emotion",
    ("ExpressionAdaptersLoadEAdapter", "e_adapter_name"): "models/expression_adapters",
    ("ExpressionAdaptersLoadEAdapter", "faceid_name"): "models/ipadapter",
    ("ExpressionAdaptersLoadEAdapter", "image_name"): "models/ipadapter",
    ("ExpressionAdaptersLoadEAdapter", "lora_name"): "models/loras",
    ("ExpressionAdaptersLoadFaceCrafter", "facecrafter_name"): "models/expression_adapters",
    ("LoadVideo", "file"): "input",
    ("InstantIDModelLoader", "instantid_file"): "models/instantid",
}
NO_FILE = "none"  # a loader's optional file left unset
FOLDER_NOTES = {  # files a loader finds by itself, without a file input
    "ExpressionAdaptersLoadInsightFace": "models/insightface/models/antelopev2/: scrfd_10g_bnkps.onnx and arcface.onnx",
    "InstantIDFaceAnalysis": "models/insightface/models/antelopev2/: insightface's antelopev2 pack, unzipped",
}
# Nodes of other packs: what the Note says about them (once per workflow, above the files)
PACK_NOTES = {
    "InstantIDAttentionPatch": (
        "Needs the ComfyUI_InstantID pack (github.com/cubiq/ComfyUI_InstantID) in custom_nodes.",
        "InstantID Patch Attention gives the identity without InstantID's ControlNet. For its pose control add",
        "Load ControlNet Model (InstantID's ControlNet), Face Keypoints Preprocessor and InstantID Apply",
        "ControlNet (face_embeds from Patch Attention) on the prompts before the KSampler.",
    ),
}


def _input_specs(node_class) -> list[tuple[str, str, dict]]:
    types = node_class.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            options = dict(spec[1]) if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                kind = "COMBO"
                options.setdefault("default", spec[0][0] if spec[0] else None)
            else:
                kind = str(spec[0])
            specs.append((name, kind, options))
    return specs


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _depths(prompt: dict) -> dict[str, int]:
    depths: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in depths:
            parents = [value[0] for value in prompt[node_id]["inputs"].values() if _is_link(value)]
            depths[node_id] = 1 + max((depth(parent) for parent in parents), default=-1)
        return depths[node_id]

    for node_id in prompt:
        depth(node_id)
    return depths


def _category(node_class) -> str:
    return str(getattr(node_class, "CATEGORY", "") or "")


def stages(prompt: dict, node_classes: dict) -> dict[str, str]:
    """The stage of each node: by type, then category; loaders of the pack and image nodes follow their neighbours."""
    consumers: dict[str, list[str]] = {node_id: [] for node_id in prompt}
    for node_id in sorted(prompt, key=int):
        for value in prompt[node_id]["inputs"].values():
            if _is_link(value):
                consumers[value[0]].append(node_id)

    def own_stage(node_id: str) -> str | None:
        class_type = prompt[node_id]["class_type"]
        if class_type in FOLLOWERS:
            return None
        if class_type in STAGE_OF_TYPE:
            return STAGE_OF_TYPE[class_type]
        category = _category(node_classes[class_type])
        if category.endswith("/loaders") or category == "loaders":
            return None
        return next((stage for part, stage in STAGE_OF_CATEGORY if part in category), None)

    found: dict[str, str] = {}

    def stage(node_id: str, seen=()) -> str:
        if node_id in found:
            return found[node_id]
        result = own_stage(node_id)
        if result is None and node_id not in seen:
            neighbours = consumers[node_id] + [v[0] for v in prompt[node_id]["inputs"].values() if _is_link(v)]
            result = next((stage(n, (*seen, node_id)) for n in neighbours if n not in seen), None)
        found[node_id] = result or "sampling"
        return found[node_id]

    for node_id in prompt:
        stage(node_id)
    return found


def node_size(class_type: str, title: str, slot_rows: int, widgets: list[tuple[str, dict]]) -> list[int]:
    """Width and body height (below the title bar) as the frontend computes them, with room for previews."""
    height = SLOT_HEIGHT * max(slot_rows, 1) + 14
    for kind, options in widgets:
        height += MULTILINE_HEIGHT if kind == "STRING" and options.get("multiline") else WIDGET_HEIGHT
    height += IMAGE_NODES.get(class_type, 0)
    width = max(MIN_WIDTH, int(TITLE_CHAR_WIDTH * len(title)) + 60)
    return [width, height]


def note_text(prompt: dict) -> str:
    types = {node["class_type"] for node in prompt.values()}
    lines = [line for class_type, note in PACK_NOTES.items() if class_type in types for line in note]
    lines.append("What to put where before you press Run (paths inside your ComfyUI folder):")
    seen = set()
    for node_id in sorted(prompt, key=int):
        node = prompt[node_id]
        for (class_type, name), folder in FILE_INPUTS.items():
            value = node["inputs"].get(name)
            if node["class_type"] == class_type and isinstance(value, str) and value != NO_FILE and (folder, value) not in seen:
                seen.add((folder, value))
                what = "a video" if class_type == "LoadVideo" else "a photo"
                lines.append(f"- {folder}/{value}  ({what}; or pick another in '{node['_meta']['title']}')"
                             if folder == "input" else f"- {folder}/{value}")
        if node["class_type"] in FOLDER_NOTES and node["class_type"] not in seen:
            seen.add(node["class_type"])
            lines.append(f"- {FOLDER_NOTES[node['class_type']]}")
    lines.append("Where to get each file: the 'Model files' table of the pack's README.")
    return "\n".join(lines)


def api_to_ui(prompt: dict, node_classes: dict) -> dict:
    depths = _depths(prompt)
    stage_of = stages(prompt, node_classes)
    links, nodes = [], []
    outputs_of: dict[str, list[dict]] = {}
    for node_id, node in prompt.items():
        node_class = node_classes[node["class_type"]]
        names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
        outputs_of[node_id] = [{"name": name, "type": kind, "links": [], "slot_index": slot}
                               for slot, (name, kind) in enumerate(zip(names, node_class.RETURN_TYPES))]

    ordered = sorted(prompt, key=lambda n: (depths[n], int(n)))
    built: dict[str, dict] = {}
    for order, node_id in enumerate(ordered):
        node = prompt[node_id]
        title = node.get("_meta", {}).get("title", node["class_type"])
        if len(title) > MAX_TITLE:
            logging.warning("node %s: title %r is longer than %d characters; shorten it in the API form",
                            node_id, title, MAX_TITLE)
        inputs, widgets, widget_specs = [], [], []
        for name, kind, options in _input_specs(node_classes[node["class_type"]]):
            value = node["inputs"].get(name, options.get("default"))
            if _is_link(value):
                link_id = len(links) + 1
                origin_id, origin_slot = value
                link_type = outputs_of[origin_id][origin_slot]["type"]
                links.append([link_id, int(origin_id), origin_slot, int(node_id), len(inputs), link_type])
                outputs_of[origin_id][origin_slot]["links"].append(link_id)
                entry = {"name": name, "type": link_type, "link": link_id}
                if kind in WIDGET_TYPES:
                    # a widget fed by a link keeps its slot in widgets_values (the frontend reads them by position)
                    entry["widget"] = {"name": name}
                    widgets.append(options.get("default"))
                    widget_specs.append((kind, options))
                    if options.get("control_after_generate"):
                        widgets.append("fixed")
                        widget_specs.append(("COMBO", {}))
                inputs.append(entry)
            elif kind in WIDGET_TYPES:
                widgets.append(value)
                widget_specs.append((kind, options))
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                    widget_specs.append(("COMBO", {}))
            else:
                inputs.append({"name": name, "type": kind, "link": None})
        slot_rows = max(sum(1 for entry in inputs if "widget" not in entry), len(outputs_of[node_id]))
        built[node_id] = {
            "id": int(node_id), "type": node["class_type"], "pos": [0, 0],
            "size": node_size(node["class_type"], title, slot_rows, widget_specs), "flags": {}, "order": order,
            "mode": 0, "inputs": inputs, "outputs": outputs_of[node_id], "title": title,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        nodes.append(built[node_id])

    note_id = max(int(n) for n in prompt) + 1
    note = {"id": note_id, "type": "Note", "pos": [0, 0], "size": [0, 0], "flags": {}, "order": len(nodes),
            "mode": 0, "inputs": [], "outputs": [], "title": "Read me", "properties": {},
            "widgets_values": [note_text(prompt)], "color": "#432", "bgcolor": "#653"}
    groups = _lay_out(built, ordered, depths, stage_of, note)
    nodes.append(note)
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": _view(nodes, groups)}, "version": 0.4}


def _lay_out(built: dict, ordered: list[str], depths: dict, stage_of: dict, note: dict) -> list[dict]:
    """Sets each node's position; returns the groups. Columns are shared by all stages so links run left to right."""
    columns = sorted(set(depths.values()))
    column_width = {c: max(built[n]["size"][0] for n in ordered if depths[n] == c) for c in columns}
    column_x, x = {}, GROUP_PADDING
    for c in columns:
        column_x[c] = x
        x += column_width[c] + COLUMN_GAP
    right = x - COLUMN_GAP + GROUP_PADDING

    note_lines = note["widgets_values"][0].split("\n")
    note["size"] = [max(640, int(7.2 * max(map(len, note_lines))) + 40), 22 * len(note_lines) + 40]
    note["pos"] = [GROUP_PADDING, TITLE_HEIGHT]
    top = note["pos"][1] + note["size"][1] + ROW_GAP

    groups = []
    for stage, (title, color) in STAGES.items():
        members = [n for n in ordered if stage_of[n] == stage]
        if not members:
            continue
        band_top = top + GROUP_TITLE
        bottom = band_top
        for c in columns:
            y = band_top
            for node_id in (n for n in members if depths[n] == c):
                node = built[node_id]
                node["pos"] = [column_x[c], y + TITLE_HEIGHT]
                node["size"][0] = column_width[c]
                y += TITLE_HEIGHT + node["size"][1] + ROW_GAP
            bottom = max(bottom, y - ROW_GAP)
        used = [column_x[depths[n]] for n in members]
        left = min(used) - GROUP_PADDING
        group_right = max(column_x[depths[n]] + column_width[depths[n]] for n in members) + GROUP_PADDING
        groups.append({"title": title, "bounding": [left, top, max(group_right, right) - left, bottom + GROUP_PADDING - top],
                       "color": color, "font_size": 24, "flags": {}})
        top = bottom + GROUP_PADDING + ROW_GAP
    return groups


def _view(nodes: list[dict], groups: list[dict]) -> dict:
    """The saved canvas view: scale and offset that frame everything in a VIEWPORT-sized window."""
    boxes = [[n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT] for n in nodes]
    boxes += [g["bounding"] for g in groups]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    margin = 20
    scale = round(min((VIEWPORT[0] - 2 * margin) / (x1 - x0), (VIEWPORT[1] - 2 * margin) / (y1 - y0), 1.0), 4)
    return {"scale": scale, "offset": [round(margin / scale - x0, 1), round(margin / scale - y0, 1)]}


def ui_path(api_path: Path) -> Path:
    """workflows/api/NAME.json -> workflows/NAME.json."""
    return api_path.resolve().parent.parent / api_path.name


def move_old_api_forms(folder: Path = WORKFLOWS) -> list[Path]:
    """workflows/NAME_api.json (the old convention) -> workflows/api/NAME.json."""
    moved = []
    for old in sorted(folder.glob("*_api.json")):
        new = folder / "api" / (old.name.removesuffix("_api.json") + ".json")
        new.parent.mkdir(exist_ok=True)
        old.replace(new)
        moved.append(new)
    return moved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("api_workflows", nargs="*", type=Path)
    parser.add_argument("--all", action="store_true", help="every workflows/api/*.json (after moving old *_api.json)")
    parser.add_argument("--comfyui")
    parser.add_argument("--custom-nodes", type=Path, action="append", default=[], metavar="DIR",
                        help="also load the pack in DIR (e.g. ComfyUI/custom_nodes/ComfyUI_InstantID): for workflows that "
                             "use other packs' nodes; repeatable")
    args = parser.parse_args(argv)
    if args.all:
        for path in move_old_api_forms():
            print(f"moved to {path}")
        args.api_workflows += sorted(API_FOLDER.glob("*.json"))
    if not args.api_workflows:
        parser.error("name API workflows (workflows/api/NAME.json) or pass --all")
    sys.path.insert(0, str(WORKFLOWS))
    import run

    comfyui = run.find_comfyui(args.comfyui)
    if comfyui is None:
        parser.error("no ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH")
    comfy_nodes = run.start_comfyui(comfyui, force_cpu=True)
    run.load_pack(comfy_nodes, Path(tempfile.mkdtemp(prefix="expression_adapters_")))
    run.load_custom_nodes(comfy_nodes, args.custom_nodes)
    for api_path in args.api_workflows:
        prompt = json.loads(api_path.read_text())
        unknown = sorted({node["class_type"] for node in prompt.values()} - set(comfy_nodes.NODE_CLASS_MAPPINGS))
        if unknown:
            parser.error(f"{api_path}: ComfyUI has no {', '.join(unknown)}: load the pack with them (--custom-nodes DIR)")
        ui = api_to_ui(prompt, comfy_nodes.NODE_CLASS_MAPPINGS)
        ui_path(api_path).write_text(json.dumps(ui, indent=1) + "\n")
        print(ui_path(api_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
