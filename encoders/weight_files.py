"""Reading encoder weight files: the library's one reader, ``adapters.checkpoints.read_checkpoint``
(safetensors, or ``.bin``/``.pt``/``.pth`` through ``torch.load(weights_only=True)``), and its way of building a
network whose weights all come from a file: under ``without_init()``, then ``assign_weights``.

``encoders`` is imported both inside the ComfyUI pack (beside ``adapters``, so relatively) and as a
top-level package (``training``, tests), where ``adapters`` is top-level too.
"""

from __future__ import annotations

try:
    from ..adapters.checkpoints import assign_weights, read_checkpoint, without_init
except ImportError:  # encoders imported as a top-level package
    from adapters.checkpoints import assign_weights, read_checkpoint, without_init

__all__ = ["assign_weights", "read_checkpoint", "without_init"]
