"""Write the drag-and-drop (UI) form of an API-format workflow, so the two never drift apart.

    python workflows/convert.py workflows/arc2face_expression_api.json   # writes ..._ui.json... as workflows/arc2face_expression.json

Node input order and socket types come from the node classes of a running ComfyUI (this pack
included), found as ``workflows/run.py`` finds it. Nodes are laid out left to right by depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_HEIGHT, NODE_WIDTH = 380, 260, 320


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


def api_to_ui(prompt: dict, node_classes: dict) -> dict:
    depths = _depths(prompt)
    rows: dict[int, int] = {}
    links, nodes = [], []
    outputs_of: dict[str, list[dict]] = {}
    for node_id, node in prompt.items():
        node_class = node_classes[node["class_type"]]
        names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
        outputs_of[node_id] = [{"name": name, "type": kind, "links": [], "slot_index": slot}
                               for slot, (name, kind) in enumerate(zip(names, node_class.RETURN_TYPES))]

    for order, node_id in enumerate(sorted(prompt, key=lambda n: (depths[n], int(n)))):
        node = prompt[node_id]
        inputs, widgets = [], []
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
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif kind in WIDGET_TYPES:
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
            else:
                inputs.append({"name": name, "type": kind, "link": None})
        column = depths[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [column * COLUMN_WIDTH, row * ROW_HEIGHT],
            "size": [NODE_WIDTH, 120 + 26 * len(widgets)], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs, "outputs": outputs_of[node_id], "title": node.get("_meta", {}).get("title", node["class_type"]),
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    return {"last_node_id": max(int(n) for n in prompt), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_path(api_path: Path) -> Path:
    return api_path.with_name(api_path.name.removesuffix("_api.json") + ".json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("api_workflows", nargs="+", type=Path)
    parser.add_argument("--comfyui")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run

    comfyui = run.find_comfyui(args.comfyui)
    if comfyui is None:
        parser.error("no ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH")
    comfy_nodes = run.start_comfyui(comfyui, force_cpu=True)
    run.load_pack(comfy_nodes, Path(tempfile.mkdtemp(prefix="expression_adapters_")))
    for api_path in args.api_workflows:
        ui = api_to_ui(json.loads(api_path.read_text()), comfy_nodes.NODE_CLASS_MAPPINGS)
        ui_path(api_path).write_text(json.dumps(ui, indent=1) + "\n")
        print(ui_path(api_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
