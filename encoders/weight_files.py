"""Reading encoder weight files: the library's one reader, ``adapters.checkpoints.read_checkpoint``
(safetensors, or ``.bin``/``.pt``/``.pth`` through ``torch.load(weights_only=True)``).

``encoders`` is imported both inside the ComfyUI pack (beside ``adapters``, so relatively) and as a
top-level package (``training``, tests), where ``adapters`` is top-level too.
"""

from __future__ import annotations

try:
    from ..adapters.checkpoints import read_checkpoint
except ImportError:  # encoders imported as a top-level package
    from adapters.checkpoints import read_checkpoint

__all__ = ["read_checkpoint"]
