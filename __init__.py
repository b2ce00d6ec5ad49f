"""Expression Adapters for ComfyUI: the entry point ComfyUI loads from custom_nodes/.

The nodes register through the V3 extension API: ComfyUI's loader awaits ``comfy_entrypoint()``
and reads each node's schema once. (There is deliberately no ``NODE_CLASS_MAPPINGS``: ComfyUI's
loader prefers it when present and would then never call the entry point.)
"""

import logging

try:
    from comfy_api.latest import ComfyExtension
except ImportError:
    # Imported outside ComfyUI (pytest collecting the repository, a tool scanning packages), or a
    # ComfyUI too old for the V3 node API: register nothing rather than fail the import.
    logging.warning("Expression Adapters: ComfyUI's V3 node API (comfy_api.latest) was not found, so no nodes are "
                    "registered; the pack needs ComfyUI 0.3.64 or newer: update ComfyUI")
else:
    from .nodes import NODES
    from .nodes.model_folders import register_model_folders

    register_model_folders()

    class ExpressionAdaptersExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return list(NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return ExpressionAdaptersExtension()

    __all__ = ["comfy_entrypoint"]
