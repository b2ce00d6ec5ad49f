"""WebDataset-style tar shards: writing, indexing, and random access to one sample.

A shard ``shard-000012.tar`` holds, per sample key, files named ``<key>.<field>.<ext>``:
``<key>.jpg`` (or ``.png``) the aligned training crop, ``<key>.json`` its metadata, and one
``<key>.<name>.npy`` per tensor (``id``, ``flame``, ``landmarks``, ``blendshapes``,
``latent_mean``, ``latent_std``). Keys hold no dots, so any WebDataset reader groups them.

Next to each finished shard a small ``shard-000012.json`` records its samples, the byte offset
and size of every member (so training reads one sample with one seek, never scanning the tar)
and what was skipped. It is written last and atomically: a shard with its ``.json`` is
complete; one without is rewritten from scratch on the next run.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SHARD_PATTERN = "shard-{index:06d}.tar"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


def sidecar_path(tar_path) -> Path:
    return Path(tar_path).with_suffix(".json")


def write_json_atomic(data, path) -> None:
    """Write, then rename: a crash never leaves a half-written file under the final name."""
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # data files never run code


class ShardWriter:
    """Writes one shard to ``<name>.partial``; :meth:`close` renames it and writes its sidecar."""

    def __init__(self, tar_path):
        self.path = Path(tar_path)
        self.temporary = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(self.temporary, "w", format=tarfile.USTAR_FORMAT)
        self.samples: list[dict] = []

    def add(self, key: str, files: Mapping[str, bytes], info: Mapping | None = None) -> None:
        """``files`` maps a field name with its extension (``jpg``, ``json``, ``id.npy``) to bytes;
        ``info`` (clip id, time) goes into the index so pairs can be drawn without reading samples."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        members = {}
        for field, data in files.items():
            member = tarfile.TarInfo(f"{key}.{field}")
            member.size = len(data)
            member.mtime = 0  # reproducible shards
            self._tar.addfile(member, io.BytesIO(data))
            # addfile wrote the header block, then the data at this offset
            members[field] = [self._tar.offset - _padded(len(data)), len(data)]
        self.samples.append({"key": key, "members": members} | dict(info or {}))

    def close(self, extra: Mapping | None = None) -> dict:
        self._tar.close()
        os.replace(self.temporary, self.path)
        record = {"format": FORMAT_VERSION, "shard": self.path.name, "num_samples": len(self.samples),
                  "samples": self.samples} | dict(extra or {})
        write_json_atomic(record, sidecar_path(self.path))
        return record

    def abort(self) -> None:
        self._tar.close()
        self.temporary.unlink(missing_ok=True)


def _padded(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def read_member(tar_path, offset: int, size: int) -> bytes:
    with open(tar_path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise OSError(f"{tar_path} is truncated: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


def load_index(source) -> list[dict]:
    """The shard records (sidecars) of a dataset: a manifest.json, a shard folder, or a glob of .tar.

    Each record gets ``path``: the absolute path of its tar.
    """
    source = str(source)
    if source.endswith(".json") and Path(source).is_file():
        manifest = json.loads(Path(source).read_text(encoding="utf-8"))
        root = Path(source).parent
        tars = [root / name for name in manifest["shards"]]
    elif Path(source).is_dir():
        tars = sorted(Path(source).glob("shard-*.tar"))
    else:
        tars = [Path(p) for p in sorted(glob.glob(source))]
    records = []
    for tar in tars:
        sidecar = sidecar_path(tar)
        if not sidecar.is_file():
            raise FileNotFoundError(f"shard {tar} has no index {sidecar.name}: it is incomplete; rerun training.prepare")
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        record["path"] = str(tar.resolve())
        records.append(record)
    if not records:
        raise FileNotFoundError(f"no complete shards found at {source}")
    return records


def read_sample(record: Mapping, position: int) -> dict:
    """Sample ``position`` of a shard as ``{field: bytes}`` plus ``__key__``."""
    sample = record["samples"][position]
    out = {"__key__": sample["key"]}
    with open(record["path"], "rb") as handle:
        for field, (offset, size) in sample["members"].items():
            handle.seek(offset)
            out[field] = handle.read(size)
            if len(out[field]) != size:
                raise OSError(f"{record['path']} is truncated at sample {sample['key']}")
    return out
