"""ComfyUI glue: thin node classes and the patches that host adapter maths inside ComfyUI models."""

from .expression_adapter_nodes import NODES as EXPRESSION_ADAPTER_NODES

NODES = [*EXPRESSION_ADAPTER_NODES]
