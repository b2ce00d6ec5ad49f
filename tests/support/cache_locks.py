"""The test cache (``$EXPRESSION_ADAPTERS_TEST_CACHE``, default ``~/.cache/expression_adapters_tests``) and the locks
by which the test process and the background workflow runs (``workflow_runs``) take turns.

- ``filling(folder)``: both may write the same full-size files (``official_files``); whoever comes first writes
  the folder, the other waits and then finds it complete.
- ``taking_turns(LARGE_MEMORY)``: a workflow run that may hold twice the 8 GB of the others (SDXL) and a test
  module marked ``large_memory`` (full-size models in the test process or in a process it starts) never run at
  the same time, so their memory never adds up past what a 24 GB machine has.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("EXPRESSION_ADAPTERS_TEST_CACHE") or Path.home() / ".cache" / "expression_adapters_tests").expanduser()


LARGE_MEMORY = "large-memory"


@contextmanager
def taking_turns(name: str) -> Iterator[None]:
    """Holds the lock ``name`` (across processes) until the block ends; waits while another process holds it."""
    lock = cache_root() / ".locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def filling(folder: str) -> Iterator[Path]:
    """``cache_root()/folder``, held by this process alone until the block ends."""
    with taking_turns(folder):
        yield cache_root() / folder
