"""Expression Adapters for ComfyUI: the entry point ComfyUI loads from custom_nodes/."""

import importlib.util
import logging

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if importlib.util.find_spec("comfy_api") is None:
    # Imported outside ComfyUI (pytest collecting the repository, a tool scanning packages), or a
    # ComfyUI too old for the V3 node API: register nothing rather than fail the import.
    logging.warning("Expression Adapters: comfy_api not found; the nodes need ComfyUI with the V3 node API (update ComfyUI)")
else:
    from .nodes import NODES
    from .nodes.model_folders import register_model_folders

    register_model_folders()
    NODE_CLASS_MAPPINGS = {node.GET_SCHEMA().node_id: node for node in NODES}
    NODE_DISPLAY_NAME_MAPPINGS = {node.GET_SCHEMA().node_id: node.GET_SCHEMA().display_name for node in NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
