"""Same-person samples drawn around each target: EmojiDiff triplets, FaceCrafter's LMK and EMO pairs.

A :class:`PartnerDataset` wraps the prepared frames: item ``(epoch, index)`` is target ``index``
with one partner per role drawn from that target's candidate list by a generator seeded with
(seed, epoch, index, role), so the draws are fixed per epoch and a resumed run
(:class:`training.data.ResumableBatchSampler` with ``with_epoch=True``) sees the same ones.
Targets with no candidate for a role are left out and counted. The candidate lists come from a
:class:`SampleTable` (person, expression, pose, camera per sample) by the rules:

- EmojiDiff Stage I triplet {S, R, D} (paper §3.2): S = the same person with another expression;
  R = D by default (spec A2: only the local-image preprocessing separates them), or optionally
  another image of the same person with the same expression.
- FaceCrafter LMK pre-training (§3.2): the ID image is the same person with a different pose and
  a different expression.
- FaceCrafter EMO pre-training: the same person and pose (the same camera where both have one,
  else |yaw| and |pitch| differences within ``same_pose_degrees``), a different expression.

"Different expression" is our reading: the mean absolute difference of the expression vectors
(MediaPipe blendshapes by default, so the scale is EmojiDiff's Exp mean) above
``expression_threshold``; "different pose": |yaw| or |pitch| differing by more than
``pose_degrees``. Both thresholds are configurable; the papers give none for sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from .data import MissingFieldsError, ShardDataset
from .shards import read_npy, read_sample

logger = logging.getLogger(__name__)

EXPRESSION_THRESHOLD = 0.05  # mean |difference| of blendshapes: the IDI filter's Exp bound
SAME_POSE_DEGREES = 5.0  # spec B3: "fixed pose" = same camera, or |dyaw|, |dpitch| < 5 degrees
POSE_DEGREES = 5.0


@dataclass
class SampleTable:
    """Per-sample attributes the rules compare (N rows, the dataset's order)."""

    person: np.ndarray  # N person ids (str)
    expression: np.ndarray | None = None  # N x E
    pose: np.ndarray | None = None  # N x 3: yaw, pitch, roll in degrees
    camera: np.ndarray | None = None  # N camera ids (str or "")

    def groups(self) -> dict[str, np.ndarray]:
        order: dict[str, list[int]] = {}
        for i, person in enumerate(self.person):
            if person:
                order.setdefault(str(person), []).append(i)
        return {k: np.asarray(v, dtype=np.int64) for k, v in order.items()}


def person_of(info: Mapping, meta: Mapping | None = None) -> str:
    """A sample's person: ``person_id`` from the index or metadata, else its clip id (one clip, one person)."""
    for source in (info, meta or {}):
        if source.get("person_id"):
            return str(source["person_id"])
    return str(info.get("clip_id") or (meta or {}).get("clip_id") or "")


def sample_table(frames: ShardDataset, expression: str | None = "blendshapes", pose: str | None = "head_pose") -> SampleTable:
    """The table of ``frames``: persons from the shard index, ``expression`` and ``pose`` arrays read per sample."""
    import json

    persons, expressions, poses, cameras = [], [], [], []
    for index in range(len(frames)):
        shard, position = (int(v) for v in frames.entries[index])
        record = frames.records[shard]
        info = record["samples"][position]
        wanted = {"json"} | {f"{name}.npy" for name in (expression, pose) if name}
        present = [f for f in wanted if f in info["members"]]
        raw = read_sample({"path": record["path"], "samples": [{"key": info["key"],
                           "members": {f: info["members"][f] for f in present}}]}, 0)
        meta = json.loads(raw["json"]) if "json" in raw else {}
        persons.append(person_of(info, meta))
        cameras.append(str(meta.get("camera") or ""))
        for name, out in ((expression, expressions), (pose, poses)):
            if name:
                if f"{name}.npy" not in raw:
                    raise MissingFieldsError(f"sample {info['key']} has no {name}; prepare it with that field")
                out.append(read_npy(raw[f"{name}.npy"]).astype(np.float64).reshape(-1))
    return SampleTable(np.asarray(persons, dtype=object), np.stack(expressions) if expression else None,
                       np.stack(poses) if pose else None, np.asarray(cameras, dtype=object))


def _expression_differs(table: SampleTable, i: int, others: np.ndarray, threshold: float) -> np.ndarray:
    distance = np.abs(table.expression[others] - table.expression[i]).mean(axis=1)
    return distance > threshold


def _pose_delta(table: SampleTable, i: int, others: np.ndarray) -> np.ndarray:
    return np.abs(table.pose[others, :2] - table.pose[i, :2])  # |dyaw|, |dpitch|


def same_person_other_expression(table: SampleTable, threshold: float = EXPRESSION_THRESHOLD) -> list[np.ndarray]:
    """EmojiDiff's S: another image of the target's person whose expression differs."""
    return _partners(table, lambda i, others: _expression_differs(table, i, others, threshold))


def same_person_same_expression(table: SampleTable, threshold: float = EXPRESSION_THRESHOLD) -> list[np.ndarray]:
    """An optional EmojiDiff R other than D: the same person with (nearly) the same expression."""
    return _partners(table, lambda i, others: ~_expression_differs(table, i, others, threshold))


def lmk_partners(table: SampleTable, expression_threshold: float = EXPRESSION_THRESHOLD,
                 pose_degrees: float = POSE_DEGREES) -> list[np.ndarray]:
    """FaceCrafter LMK pairs: the same person, a different pose and a different expression."""
    def rule(i, others):
        pose_differs = (_pose_delta(table, i, others) > pose_degrees).any(axis=1)
        return pose_differs & _expression_differs(table, i, others, expression_threshold)
    return _partners(table, rule)


def emo_partners(table: SampleTable, expression_threshold: float = EXPRESSION_THRESHOLD,
                 same_pose_degrees: float = SAME_POSE_DEGREES) -> list[np.ndarray]:
    """FaceCrafter EMO pairs: the same person and pose (same camera, or yaw/pitch within the bound), another expression."""
    def rule(i, others):
        same_pose = (_pose_delta(table, i, others) <= same_pose_degrees).all(axis=1)
        if table.camera is not None and table.camera[i]:
            cameras = table.camera[others]
            same_pose = np.where(cameras != "", cameras == table.camera[i], same_pose)
        return same_pose & _expression_differs(table, i, others, expression_threshold)
    return _partners(table, rule)


def _partners(table: SampleTable, rule) -> list[np.ndarray]:
    partners = [np.zeros(0, dtype=np.int64) for _ in range(len(table.person))]
    for members in table.groups().values():
        for i in members:
            others = members[members != i]
            if len(others):
                partners[i] = others[rule(int(i), others)]
    return partners


class PartnerDataset(Dataset):
    """Targets with a partner per role: items ``(epoch, index)``; partner fields come prefixed ``<role>_``.

    ``roles`` maps a role name (``source`` for the ID image S, ``reference`` for R) to the
    candidate list of every frame (:func:`same_person_other_expression`, ...). A role missing from
    ``roles`` but named in ``same_as_target`` is the target itself (EmojiDiff's default R = D).
    """

    def __init__(self, frames: ShardDataset, roles: Mapping[str, Sequence[np.ndarray]], seed: int = 0,
                 same_as_target: Sequence[str] = ()):
        self.frames, self.seed = frames, int(seed)
        self.role_names = list(roles)
        self.same_as_target = list(same_as_target)
        keep = [i for i in range(len(frames)) if all(len(roles[r][i]) for r in self.role_names)]
        self.left_out = len(frames) - len(keep)
        if not keep:
            raise MissingFieldsError(f"no sample has a partner for every role {self.role_names}: each needs other images "
                                     "of its person (person_id) that fit the rule (expression, pose)")
        if self.left_out:
            logger.warning("left out %d of %d targets without partners for %s", self.left_out, len(frames), self.role_names)
        self.targets = np.asarray(keep, dtype=np.int64)
        self.partners = {r: [np.asarray(roles[r][i]) for i in keep] for r in self.role_names}
        shards = frames.entries[self.targets, 0]
        self.shard_ranges = [(int(np.flatnonzero(shards == s)[0]), int(np.flatnonzero(shards == s)[-1]) + 1)
                             for s in np.unique(shards)]

    def __len__(self) -> int:
        return len(self.targets)

    def draw(self, epoch: int, index: int) -> dict[str, int]:
        """The frames' indices of each role's partner for this item."""
        chosen = {}
        for number, role in enumerate(self.role_names):
            candidates = self.partners[role][index]
            rng = np.random.default_rng([self.seed, int(epoch), int(index), number])
            chosen[role] = int(candidates[rng.integers(len(candidates))])
        return chosen

    def __getitem__(self, item) -> dict:
        epoch, index = item
        target = self.frames[int(self.targets[index])]
        out = dict(target)
        for role, frame in self.draw(epoch, index).items():
            out.update({f"{role}_{name}": value for name, value in self.frames[frame].items()})
        for role in self.same_as_target:
            out.update({f"{role}_{name}": value for name, value in target.items()})
        return out
