"""Same-person samplers on hand-built manifests: EmojiDiff triplets, FaceCrafter LMK and EMO pairs.

Each test writes a few samples with known persons, blendshapes (expression) and head poses, so
which partners are allowed is known by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.data import MissingFieldsError, ResumableBatchSampler, ShardDataset
from training.pair_samplers import (
    PartnerDataset,
    emo_partners,
    lmk_partners,
    same_person_other_expression,
    same_person_same_expression,
    sample_table,
)
from training.shards import ShardWriter, load_index, npy_bytes, shard_name

NEUTRAL, SMILE, FROWN = (np.full(52, v, np.float32) for v in (0.0, 0.3, 0.6))
# key: (person, expression, (yaw, pitch, roll), camera)
SAMPLES = {
    "a0": ("anna", NEUTRAL, (0, 0, 0), "front"),
    "a1": ("anna", SMILE, (0, 2, 0), "front"),
    "a2": ("anna", SMILE, (30, 0, 0), "left"),
    "a3": ("anna", NEUTRAL + 0.01, (31, 0, 0), "left"),  # a0's expression, within the threshold
    "b0": ("ben", NEUTRAL, (0, 0, 0), ""),
    "b1": ("ben", FROWN, (3, -4, 10), ""),
    "b2": ("ben", FROWN, (20, 0, 0), ""),
    "c0": ("cleo", SMILE, (0, 0, 0), ""),  # alone: no partner of any kind
}


@pytest.fixture
def frames(tmp_path):
    keys = list(SAMPLES)
    for shard, chunk in enumerate((keys[:4], keys[4:])):
        writer = ShardWriter(tmp_path / shard_name(shard))
        for key in chunk:
            person, expression, pose, camera = SAMPLES[key]
            files = {"json": json.dumps({"camera": camera}).encode(), "blendshapes.npy": npy_bytes(expression),
                     "head_pose.npy": npy_bytes(np.float32(pose))}
            writer.add(key, files, {"person_id": person})
        writer.close({})
    return ShardDataset(load_index(tmp_path), ["blendshapes", "head_pose"], load_image=False)


def named(frames, partners):
    return {frames.info(i)["key"]: sorted(frames.info(int(j))["key"] for j in p) for i, p in enumerate(partners)}


def test_partner_rules_on_a_hand_built_manifest(frames):
    table = sample_table(frames)
    assert list(table.person) == [p for p, *_ in SAMPLES.values()]
    assert named(frames, same_person_other_expression(table)) == {
        "a0": ["a1", "a2"], "a1": ["a0", "a3"], "a2": ["a0", "a3"], "a3": ["a1", "a2"],
        "b0": ["b1", "b2"], "b1": ["b0"], "b2": ["b0"], "c0": []}
    assert named(frames, same_person_same_expression(table))["a0"] == ["a3"]
    # LMK: another pose (|dyaw| or |dpitch| > 5) and another expression
    assert named(frames, lmk_partners(table)) == {
        "a0": ["a2"], "a1": ["a3"], "a2": ["a0"], "a3": ["a1"], "b0": ["b2"], "b1": [], "b2": ["b0"], "c0": []}
    # EMO: same camera where known (a0/a1 front, a2/a3 left), else yaw and pitch within 5 degrees
    assert named(frames, emo_partners(table)) == {
        "a0": ["a1"], "a1": ["a0"], "a2": ["a3"], "a3": ["a2"], "b0": ["b1"], "b1": ["b0"], "b2": [], "c0": []}
    assert named(frames, emo_partners(table, same_pose_degrees=30))["b2"] == ["b0"]


def test_triplets_default_to_reference_equal_target_and_draw_deterministically(frames):
    table = sample_table(frames)
    triplets = PartnerDataset(frames, {"source": same_person_other_expression(table)}, seed=3,
                              same_as_target=["reference"])
    assert triplets.left_out == 1  # cleo
    item = triplets[(0, 0)]
    assert item["key"] == item["reference_key"] == "a0" and item["source_key"] in ("a1", "a2")
    for epoch in range(3):
        for index in range(len(triplets)):
            first, again = triplets[(epoch, index)], triplets[(epoch, index)]
            assert first["source_key"] == again["source_key"]
            assert table.person[int(triplets.targets[index])] == table.person[
                [frames.info(i)["key"] for i in range(len(frames))].index(first["source_key"])]
    # draws change between epochs somewhere, not within one
    draws = {epoch: [triplets.draw(epoch, i)["source"] for i in range(len(triplets))] for epoch in range(8)}
    assert len({tuple(v) for v in draws.values()}) > 1


def test_pairs_resume_with_the_batch_sampler(frames):
    table = sample_table(frames)
    pairs = PartnerDataset(frames, {"source": emo_partners(table)}, seed=0)
    sampler = ResumableBatchSampler(pairs, 2, seed=1, shuffle_shards=2, with_epoch=True)
    stream = iter(sampler)
    batches = [[(e, i, pairs[(e, i)]["source_key"]) for e, i in next(stream)] for _ in range(6)]
    resumed = iter(ResumableBatchSampler(pairs, 2, seed=1, shuffle_shards=2, start=3, with_epoch=True))
    assert [[(e, i, pairs[(e, i)]["source_key"]) for e, i in next(resumed)] for _ in range(3)] == batches[3:]


def test_no_partner_at_all_is_a_clear_error(frames):
    table = sample_table(frames)
    with pytest.raises(MissingFieldsError, match="person_id"):
        PartnerDataset(frames, {"source": lmk_partners(table, pose_degrees=90)})
