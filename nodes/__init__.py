"""ComfyUI glue: thin node classes and the patches that host adapter maths inside ComfyUI models."""

from .e_adapter_nodes import NODES as E_ADAPTER_NODES
from .expression_adapter_nodes import NODES as EXPRESSION_ADAPTER_NODES
from .expression_control_nodes import NODES as EXPRESSION_CONTROL_NODES
from .expression_encoder_nodes import NODES as EXPRESSION_ENCODER_NODES
from .facecrafter_nodes import NODES as FACECRAFTER_NODES
from .identity_nodes import NODES as IDENTITY_NODES
from .reference_nodes import NODES as REFERENCE_NODES

NODES = [*EXPRESSION_ADAPTER_NODES, *IDENTITY_NODES, *EXPRESSION_ENCODER_NODES, *EXPRESSION_CONTROL_NODES, *REFERENCE_NODES,
         *E_ADAPTER_NODES, *FACECRAFTER_NODES]
