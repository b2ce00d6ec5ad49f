"""The test cache (``$EXPRESSION_ADAPTERS_TEST_CACHE``, default ``~/.cache/expression_adapters_tests``) and the lock
by which processes take turns filling it.

The workflow runs prepare their models in a background process while the test process may write the same
full-size files (``official_files``): whoever comes first writes a folder, the other waits and then finds it
complete.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("EXPRESSION_ADAPTERS_TEST_CACHE") or Path.home() / ".cache" / "expression_adapters_tests")


@contextmanager
def filling(folder: str) -> Iterator[Path]:
    """``cache_root()/folder``, held by this process alone until the block ends (blocks while another holds it)."""
    lock = cache_root() / ".locks" / f"{folder}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield cache_root() / folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
