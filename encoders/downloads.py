"""Fetch published model files into ComfyUI's model folders, only when the user asks.

Every file is checked first; a missing one is downloaded (if allowed):
- from the model hub with ``huggingface_hub.hf_hub_download``, the ecosystem's downloader: it honours
  ``HF_ENDPOINT`` (a mirror; read at call time here) and ``HF_TOKEN`` (gated repositories), resumes an
  interrupted transfer, and checks the size it was promised. It downloads into a hidden staging folder
  beside the destination (``.hf_download/``, which keeps the resumable part) and the finished file is
  then renamed into place;
- from other hosts (MediaPipe's model store) to a temporary ``.part`` file beside the destination, renamed
  into place only when complete and, where the project knows them, of the right size and sha256.
So an interrupted download never leaves a file that looks finished. When a file cannot be fetched, or
downloading is off, the error lists each source and the exact path to save it at.

The files are data (:data:`FILE_GROUPS`); destinations are ``(models folder name, relative path)``
so the ComfyUI layer can map folder names through ``folder_paths``.

Command line: ``python -m encoders.downloads arc2face --models-dir ComfyUI/models [--check]``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One published file: hub ``repo``/``filename`` (or a plain ``url``) -> ``folder``/``path``.

    ``manual``: no direct download exists; the text says where to get the file.
    ``size`` / ``sha256``: what a file from another host must be (checked after download), where known.
    """

    folder: str
    path: str
    repo: str | None = None
    filename: str | None = None
    revision: str = "main"
    url: str | None = None
    manual: str | None = None
    size: int | None = None
    sha256: str | None = None

    def source(self, endpoint: str | None = None) -> str:
        if self.url or self.manual:
            return self.url or self.manual
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return f"{endpoint}/{self.repo}/resolve/{quote(self.revision, safe='')}/{quote(self.filename)}"


ARC2FACE_REPO = "FoivosPar/Arc2Face"

FILE_GROUPS: dict[str, tuple[RemoteFile, ...]] = {
    # Arc2Face base model: UNet (loads with ComfyUI's diffusion-model loader), ID encoder, recogniser.
    "arc2face": (
        RemoteFile("diffusion_models", "arc2face/config.json", ARC2FACE_REPO, "arc2face/config.json"),
        RemoteFile(
            "diffusion_models", "arc2face/diffusion_pytorch_model.safetensors",
            ARC2FACE_REPO, "arc2face/diffusion_pytorch_model.safetensors",
        ),
        RemoteFile("arc2face", "encoder/config.json", ARC2FACE_REPO, "encoder/config.json"),
        RemoteFile("arc2face", "encoder/pytorch_model.bin", ARC2FACE_REPO, "encoder/pytorch_model.bin"),
        RemoteFile("insightface", "models/antelopev2/arcface.onnx", ARC2FACE_REPO, "arcface.onnx"),
    ),
    # The expression extension (ICCV-W 2025): Expression Adapter and Reference Adapter LoRA.
    "arc2face_expression": (
        RemoteFile("expression_adapters", "exp_adapter.bin", ARC2FACE_REPO, "exp_adapter/exp_adapter.bin"),
        RemoteFile(
            "expression_adapters", "ref_adapter/pytorch_lora_weights.safetensors",
            ARC2FACE_REPO, "ref_adapter/pytorch_lora_weights.safetensors",
        ),
    ),
    # antelopev2's detector is only published inside a zip.
    "antelopev2": (
        RemoteFile(
            "insightface", "models/antelopev2/scrfd_10g_bnkps.onnx",
            manual="antelopev2.zip from insightface's model zoo "
            "(https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip), unzipped",
        ),
    ),
    "smirk": (
        RemoteFile(
            "smirk", "SMIRK_em1.pt",
            manual="SMIRK's pretrained model (Google Drive link in https://github.com/georgeretsi/smirk's README)",
        ),
        # The versioned float16 bundle (face detector, 478-point landmarker, blendshapes); "latest" could change.
        RemoteFile(
            "mediapipe", "face_landmarker.task",
            url="https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/"
            "face_landmarker.task",
            size=3758596, sha256="64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff",
        ),
    ),
}


class MissingModelFiles(FileNotFoundError):
    """Files not in place; ``missing`` holds ``(source, destination)`` for each."""

    def __init__(self, message: str, missing: list[tuple[str, Path]]):
        super().__init__(message)
        self.missing = missing


def destination(entry: RemoteFile, models_dir, folders: Mapping[str, os.PathLike] | None = None) -> Path:
    """Where a file belongs: ``folders[entry.folder]`` when given, else ``models_dir/<folder>``."""
    base = Path(folders[entry.folder]) if folders and entry.folder in folders else Path(models_dir) / entry.folder
    return base / entry.path


def _instructions(missing: list[tuple[str, Path]]) -> str:
    lines = ["Put these files in place by hand (download each and save it at the path shown):"]
    for source, path in missing:
        lines.append(f"  {source}\n    -> {path}")
    return "\n".join(lines)


def _progress_bar(total: int | None, label: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)


def download_file(url: str, path, *, timeout: float = 60.0, progress: bool = True, size: int | None = None,
                  sha256: str | None = None) -> Path:
    """Download ``url`` to a temporary file beside ``path`` and rename it into place when complete (and, when
    given, of ``size`` bytes with this ``sha256``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "comfyui-expression-adapters"})
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _progress_bar(total, path.name) if progress else None
            received = 0
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and received != total:
            raise OSError(f"the download stopped after {received} of {total} bytes")
        if size is not None and received != size:
            raise OSError(f"got {received} bytes where the published file has {size}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise OSError(f"sha256 {digest.hexdigest()} differs from the published file's {sha256}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


STAGING = ".hf_download"  # hf_hub_download's local_dir beside the destination: the resumable part lives here


def first_hop(url: str) -> tuple[str, int]:
    """The host and port a request for ``url`` connects to first: its proxy's where one applies (the standard
    ``*_PROXY`` / ``NO_PROXY`` variables, as requests and huggingface_hub read them)."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def check_reachable(url: str, timeout: float) -> None:
    """Stop at once where the server (or the proxy before it) cannot be found or refuses: huggingface_hub retries
    a refused connection five times with backoff, 23 seconds, before it gives up."""
    try:
        socket.create_connection(first_hop(url), timeout=min(timeout, 10.0)).close()
    except OSError as error:
        raise urllib.error.URLError(error) from error


def hub_download(entry: RemoteFile, path, *, endpoint: str | None = None, timeout: float = 60.0) -> Path:
    """``entry``'s hub file through ``hf_hub_download`` (HF_ENDPOINT, HF_TOKEN, resume, size check), renamed to ``path``."""
    from huggingface_hub import hf_hub_download

    path = Path(path)
    staging = path.parent / STAGING
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    check_reachable(endpoint, timeout)
    try:
        fetched = hf_hub_download(entry.repo, entry.filename, revision=entry.revision, local_dir=staging,
                                  endpoint=endpoint, etag_timeout=timeout)
    except Exception:
        if not any(staging.rglob("*.incomplete")):  # keep the staging folder only where there is a part to resume
            shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(fetched, path)
    shutil.rmtree(staging, ignore_errors=True)  # done: nothing left to resume
    return path


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"cannot reach the server: {error.reason}"
    chain = [error, error.__cause__, error.__context__]
    for candidate in chain:  # huggingface_hub's errors carry the HTTP response, or wrap the one that does
        response = getattr(candidate, "response", None)
        if getattr(response, "status_code", None):
            return f"HTTP {response.status_code} {getattr(response, 'reason_phrase', '')}".strip()
    for candidate in chain:
        if candidate is not None and "connect" in type(candidate).__name__.lower():
            return f"cannot reach the server: {candidate}"
    return str(error) or type(error).__name__


def ensure_files(
    files: str | Iterable[RemoteFile],
    models_dir,
    *,
    download: bool = False,
    folders: Mapping[str, os.PathLike] | None = None,
    endpoint: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Check a group (a :data:`FILE_GROUPS` name) or list of files; download the missing ones if ``download``.

    Returns the destinations. Raises :class:`MissingModelFiles` listing ``source -> destination``
    for every file still missing (with the reason when a download failed).
    """
    entries = FILE_GROUPS[files] if isinstance(files, str) else tuple(files)
    places = [destination(entry, models_dir, folders) for entry in entries]
    missing = []
    for entry, path in zip(entries, places):
        if _present(path, entry):
            logger.info("Model file present: %s", path)
        else:
            missing.append((entry, entry.source(endpoint), path))
    if not missing:
        return places
    if not download:
        listing = [(source, path) for _, source, path in missing]
        raise MissingModelFiles(f"{len(missing)} model file(s) missing. {_instructions(listing)}", listing)
    for entry, source, path in missing:
        if entry.manual:
            continue
        logger.info("Downloading %s -> %s", source, path)
        try:
            if entry.repo and not entry.url:
                hub_download(entry, path, endpoint=endpoint, timeout=timeout)
            else:
                download_file(source, path, timeout=timeout, progress=progress, size=entry.size, sha256=entry.sha256)
        except Exception as error:
            still = [(source, path) for pending, source, path in missing if not _present(path, pending)]
            raise MissingModelFiles(
                f"Could not download {source} ({_reason(error)}). {_instructions(still)}", still
            ) from error
        logger.info("Saved %s", path)
    manual = [(source, path) for entry, source, path in missing if entry.manual]
    if manual:
        raise MissingModelFiles("Some files cannot be downloaded automatically. " + _instructions(manual), manual)
    return places


def _present(path: Path, entry: RemoteFile | None = None) -> bool:
    """A finished file: non-empty and, where the published size is known, of that size."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    return entry is None or entry.size is None or path.stat().st_size == entry.size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoders.downloads", description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="+", choices=sorted(FILE_GROUPS), help="which files")
    parser.add_argument("--models-dir", required=True, help="ComfyUI's models folder")
    parser.add_argument("--check", action="store_true", help="only report what is missing; download nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = False
    for group in args.groups:
        try:
            ensure_files(group, args.models_dir, download=not args.check)
        except MissingModelFiles as error:
            print(error, file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
