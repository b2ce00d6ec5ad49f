"""Training data from prepared shards: a map-style dataset and a resumable batch sampler.

Streaming without holding the data in memory, and resuming exactly, both come from one idea:
the order of an epoch is a pure function of (seed, epoch) computed from the shard indexes
alone (sample counts, never the samples). Shards are shuffled, taken in groups of
``shuffle_shards`` and the samples of a group are shuffled together; so at any time a process
reads from only a few shards (local disk or a mounted bucket, one seek per sample). The data
position of a run is then one number, the micro-batches consumed so far.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .shards import read_npy, read_sample

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "png")


class MissingFieldsError(ValueError):
    pass


class ShardDataset(Dataset):
    """Samples of the shard ``records`` (see :func:`training.shards.load_index`) that have ``required`` fields.

    ``required``: tensor names such as ``id``, ``flame``, ``latent_mean``; ``image`` for the crop.
    Samples lacking a field are left out and counted; if none is left, the error says which
    fields the data has and how to produce the missing ones.
    """

    def __init__(self, records: list[Mapping], required: Iterable[str], resolution: int | None = None,
                 load_image: bool = True, load_latents: bool = False):
        self.records = list(records)
        self.required = set(required)
        self.resolution = resolution
        self.load_image = load_image
        self.load_latents = load_latents
        wanted = self.required | ({"image"} if load_image else set()) | ({"latent_mean", "latent_std"} if load_latents else set())
        entries, missing = [], {}
        for shard, record in enumerate(self.records):
            for position, sample in enumerate(record["samples"]):
                have = _field_names(sample["members"])
                lacking = wanted - have
                if lacking:
                    for name in lacking:
                        missing[name] = missing.get(name, 0) + 1
                    continue
                entries.append((shard, position))
        if not entries:
            fields = sorted({name for record in self.records for s in record["samples"] for name in _field_names(s["members"])})
            raise MissingFieldsError(
                f"no sample has all of {sorted(wanted)}; the data has {fields}. Missing counts: {missing}. "
                "landmarks/blendshapes need prepare --landmarker; latent_mean/latent_std need prepare --vae "
                "(or set data.use_cached_latents: false and give model.vae)"
            )
        if missing:
            logger.warning("left out samples without the needed fields: %s", missing)
        self.missing = missing
        self.entries = np.asarray(entries, dtype=np.int64)
        # Each shard's samples as one contiguous range of dataset indices (used for epoch plans).
        self.shard_ranges = []
        shards = self.entries[:, 0]
        for shard in range(len(self.records)):
            where = np.flatnonzero(shards == shard)
            if len(where):
                self.shard_ranges.append((int(where[0]), int(where[-1]) + 1))
        self._clip_frames = None
        self.unreadable = 0

    def __len__(self) -> int:
        return len(self.entries)

    def info(self, index: int) -> Mapping:
        shard, position = self.entries[index]
        return self.records[shard]["samples"][position]

    def __getitem__(self, index: int) -> dict:
        # A sample damaged after prepare (truncated file, bad image bytes) is replaced by the next
        # readable one, the same one on every run, rather than ending a long run mid-epoch.
        for offset in range(min(len(self), 100)):
            shard, position = (int(v) for v in self.entries[(index + offset) % len(self)])
            try:
                return self.decode(read_sample(self.records[shard], position))
            except (OSError, ValueError) as error:
                self.unreadable += 1
                logger.warning("skipping unreadable sample %s of %s: %s", position, self.records[shard]["path"], error)
        raise OSError(f"100 samples in a row from index {index} cannot be read; the shards look damaged")

    def decode(self, raw: Mapping[str, bytes]) -> dict:
        out = {"key": raw["__key__"], "meta": json.loads(raw["json"]) if "json" in raw else {}}
        for field, data in raw.items():
            if field.endswith(".npy"):
                name = field[: -len(".npy")]
                if name in self.required or (self.load_latents and name.startswith("latent_")):
                    out[name] = torch.from_numpy(read_npy(data).astype(np.float32))
        if self.load_image:
            out["pixels"] = decode_image(raw, self.resolution)
        return out

    # pairs within clips (Reference Adapter training) --------------------------------------

    def clip_partners(self, index: int, window_s: float) -> np.ndarray:
        """Dataset indices of the other frames of ``index``'s clip within ``window_s`` seconds."""
        if self._clip_frames is None:
            frames: dict[str, list[tuple[float, int]]] = {}
            for i in range(len(self)):
                info = self.info(i)
                if info.get("clip_id"):
                    frames.setdefault(info["clip_id"], []).append((float(info.get("time_s") or 0.0), i))
            self._clip_frames = frames
        info = self.info(index)
        clip = info.get("clip_id")
        if not clip:
            return np.zeros(0, dtype=np.int64)
        time = float(info.get("time_s") or 0.0)
        return np.asarray([i for t, i in self._clip_frames[clip] if i != index and abs(t - time) <= window_s], dtype=np.int64)


def _field_names(members: Mapping) -> set[str]:
    names = set()
    for field in members:
        if field in IMAGE_FIELDS:
            names.add("image")
        elif field.endswith(".npy"):
            names.add(field[: -len(".npy")])
    return names


def decode_image(raw: Mapping[str, bytes], resolution: int | None) -> torch.Tensor:
    """The crop as 3 x S x S float in -1..1 (the VAE's range), resized to ``resolution`` if it differs."""
    import cv2

    field = next(f for f in IMAGE_FIELDS if f in raw)
    bgr = cv2.imdecode(np.frombuffer(raw[field], dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"sample {raw['__key__']}: its {field} image cannot be decoded")
    if resolution and bgr.shape[:2] != (resolution, resolution):
        bgr = cv2.resize(bgr, (resolution, resolution), interpolation=cv2.INTER_AREA)
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1).float()
    return rgb / 127.5 - 1.0


def collate(samples: list[dict]) -> dict:
    out = {}
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def epoch_order(dataset: ShardDataset, seed: int, epoch: int, shuffle_shards: int) -> np.ndarray:
    """Dataset indices of one epoch: shards shuffled, samples shuffled within groups of ``shuffle_shards`` shards."""
    rng = np.random.default_rng([seed, epoch])
    ranges = [dataset.shard_ranges[k] for k in rng.permutation(len(dataset.shard_ranges))]
    order = []
    group = max(1, int(shuffle_shards))
    for start in range(0, len(ranges), group):
        indices = np.concatenate([np.arange(a, b) for a, b in ranges[start:start + group]])
        order.append(indices[rng.permutation(len(indices))])
    return np.concatenate(order)


class ResumableBatchSampler(Sampler):
    """Endless batches for process ``rank`` of ``world``, starting after ``start`` batches.

    Each global batch (``batch_size`` x ``world`` samples of the epoch order) is split by rank;
    an epoch's tail shorter than a global batch is dropped. ``start`` counts this process's
    batches already consumed, which is the same number on every rank.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int = 0, shuffle_shards: int = 4,
                 world: int = 1, rank: int = 0, start: int = 0, with_epoch: bool = False):
        self.dataset = dataset
        self.with_epoch = with_epoch  # yield (epoch, index) items, for datasets that draw per epoch
        self.batch_size = int(batch_size)
        self.seed, self.shuffle_shards = int(seed), int(shuffle_shards)
        self.world, self.rank = int(world), int(rank)
        self.start = int(start)
        global_batch = self.batch_size * self.world
        self.batches_per_epoch = len(dataset) // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the data has {len(dataset)} usable samples, fewer than one global batch "
                             f"({self.batch_size} per process x {self.world} processes)")

    def __iter__(self):
        epoch, batch = divmod(self.start, self.batches_per_epoch)
        global_batch = self.batch_size * self.world
        while True:
            order = epoch_order(self.dataset, self.seed, epoch, self.shuffle_shards)
            for b in range(batch, self.batches_per_epoch):
                chunk = order[b * global_batch:(b + 1) * global_batch]
                mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
                yield [(epoch, i) for i in mine] if self.with_epoch else mine
            epoch, batch = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only asks for progress display
        return self.batches_per_epoch


class PairDataset(Dataset):
    """Reference/target pairs: two frames of one clip within ``window_s`` seconds (paper §3.4).

    Items are ``(epoch, index)`` (see ``ResumableBatchSampler(with_epoch=True)``): the target is
    frame ``index`` and its reference is drawn from its clip's other frames with a generator
    seeded by (seed, epoch, index), so a resumed run draws the same pairs. The reference is read
    for its identity embedding and latents; the target for its expression and latents.
    """

    def __init__(self, frames: ShardDataset, window_s: float = 2.0, seed: int = 0):
        self.frames, self.window_s, self.seed = frames, float(window_s), int(seed)
        partners = [frames.clip_partners(i, self.window_s) for i in range(len(frames))]
        keep = [i for i, p in enumerate(partners) if len(p)]
        if not keep:
            raise MissingFieldsError(
                "reference_lora trains on pairs of video frames: no frame has another frame of its clip within "
                f"{self.window_s} s. Prepare video clips with training.prepare (their frames carry clip ids)")
        self.targets = np.asarray(keep, dtype=np.int64)
        self.partners = [partners[i] for i in keep]
        # the batch sampler plans epochs over this dataset's indices, shard by shard
        self.shard_ranges = _ranges(frames.entries[self.targets, 0])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, item) -> dict:
        epoch, index = item
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        partners = self.partners[index]
        target = self.frames[int(self.targets[index])]
        reference = self.frames[int(partners[rng.integers(len(partners))])]
        out = {k: v for k, v in target.items() if k != "id"}
        out["id"] = reference["id"]
        out["reference_key"] = reference["key"]
        for name in ("latent_mean", "latent_std", "pixels"):
            if name in reference:
                out[f"reference_{name}"] = reference[name]
        return out


def _ranges(shards: np.ndarray) -> list[tuple[int, int]]:
    ranges = []
    for shard in np.unique(shards):
        where = np.flatnonzero(shards == shard)
        ranges.append((int(where[0]), int(where[-1]) + 1))
    return ranges
