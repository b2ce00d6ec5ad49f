"""workflows/run.py builds ComfyUI's PromptExecutor for the constructor the running ComfyUI has.

0.3.64 (the CI's snapshot) takes ``PromptExecutor(server, cache_type=False, cache_size=None)``; newer versions
(0.38) take ``PromptExecutor(server, cache_type=False, cache_args=None, asset_manager=None)`` and read
``cache_args["ram"]`` without a None check, so the old call failed on the first execute. The newer shape
cannot run here (no newer ComfyUI source), so it is given by a class with exactly its signature; the
0.3.64 shape is ComfyUI's real class.
"""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace

import pytest

from workflows import run as runner


class NewerCacheType(Enum):  # the members newer ComfyUI's CacheType has
    CLASSIC = 0
    LRU = 1
    RAM_PRESSURE = 2
    NONE = 3


class NewerPromptExecutor:
    """Newer ComfyUI's constructor signature; it keeps what it was given."""

    def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
        self.server, self.cache_type, self.cache_args, self.asset_manager = server, cache_type, cache_args, asset_manager


def test_the_newer_constructor_gets_a_cache_args_dict():
    executor = runner.new_executor(SimpleNamespace(PromptExecutor=NewerPromptExecutor, CacheType=NewerCacheType))
    assert executor.cache_type is NewerCacheType.CLASSIC
    assert executor.cache_args == {"lru": 0, "ram": 0, "ram_inactive": 0}  # execute_async reads cache_args["ram"]
    assert executor.asset_manager is None and hasattr(executor.server, "send_sync")


@pytest.mark.comfyui
def test_the_0_3_64_constructor_is_called_as_before(comfy):
    import execution

    executor = runner.new_executor()
    assert isinstance(executor, execution.PromptExecutor) and executor.cache_size is None
    assert executor.cache_type is False  # its default: the classic cache
