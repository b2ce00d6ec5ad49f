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

__all__ = ["assign_weights", "fill_batchnorm_counters", "read_checkpoint", "without_init"]


def fill_batchnorm_counters(expected, state: dict) -> None:
    """Adds to ``state`` the BatchNorm counters (``num_batches_tracked``) that ``expected`` (a module's state dict)
    has and the file leaves out: published files often omit them, and only training reads them (a fresh count, 0)."""
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.new_zeros(value.shape, device="cpu")

