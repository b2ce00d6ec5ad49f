"""A UI workflow checked against ComfyUI's own node definitions (what its ``/object_info`` route serves):
every node type exists, each widget value fits its input (type, range, choices) and every link joins
an output and an input of the same type."""

from __future__ import annotations

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}


def _choices(spec: list):
    """The allowed values of a combo input, or None when the input is not a combo."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options", [])
    return None


def _value_problem(name: str, spec: list, value) -> str | None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    choices = _choices(spec)
    if choices is not None:
        return None if value in choices else f"{name}={value!r} is not one of {choices[:8]}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not float(value).is_integer()):
            return f"{name}={value!r} is not an {kind}"
        if ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
            return f"{name}={value!r} is outside {options.get('min')}..{options.get('max')}"
        return None
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    return None


def problems(workflow: dict, object_info: dict) -> list[str]:
    found = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info.get(node["type"])
        where = f"node {node['id']} ({node['type']})"
        if info is None:
            found.append(f"{where}: ComfyUI has no such node")
            continue
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = [*info["input_order"].get("required", []), *info["input_order"].get("optional", [])]
        linked = {entry["name"] for entry in node["inputs"] if entry.get("link") is not None}
        for entry in node["inputs"]:
            if entry["name"] not in specs:
                found.append(f"{where}: input {entry['name']!r} is not one of the node's inputs")
        values = list(node.get("widgets_values", []))
        for name in order:
            spec = specs[name]
            widget = _choices(spec) is not None or spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING")
            if not widget:
                continue
            if not values:
                found.append(f"{where}: no value for widget {name!r}")
                break
            value = values.pop(0)  # a widget fed by a link keeps its slot; its value is not used
            problem = None if name in linked else _value_problem(name, spec, value)
            if problem:
                found.append(f"{where}: {problem}")
            if len(spec) > 1 and spec[1].get("control_after_generate"):
                control = values.pop(0) if values else None
                if control not in CONTROL_AFTER_GENERATE:
                    found.append(f"{where}: {name}'s control_after_generate is {control!r}")
        if values:
            found.append(f"{where}: {len(values)} widget value(s) left over: {values}")
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        origin_type = object_info[nodes[origin]["type"]]["output"][origin_slot]
        entry = nodes[target]["inputs"][target_slot]
        target_info = object_info[nodes[target]["type"]]["input"]
        spec = {**target_info.get("required", {}), **target_info.get("optional", {})}[entry["name"]]
        target_type = "COMBO" if _choices(spec) is not None else spec[0]
        accepted = set(target_type.split(","))  # a multi-type input lists its types with commas
        if not accepted & {origin_type, "*"} or link_type != origin_type:
            found.append(f"link {link_id}: {nodes[origin]['type']} output {origin_slot} ({origin_type}) -> "
                         f"{nodes[target]['type']}.{entry['name']} ({target_type}), saved as {link_type}")
    return found
