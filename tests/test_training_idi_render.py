"""IDI's render itself (training/idi.py, Stage II): the base E-Adapter renders with the portrait P's identity
embedding and the real image X's CLIP embedding, and the swapper receives exactly that render as its target and
P as its source. tests/test_training_emojidiff.py checks the filter and the shards with a swapper that returns P
and ignores the render; here a recording swapper keeps what it was given.

Expected values: P's crop as stored on disk (decoded with OpenCV); the render for the embeddings read from the
shards, compared with the renders for the wrong embeddings (X's identity, P's expression) so the test tells
them apart.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_training_emojidiff import base_export, demo  # noqa: F401 - module fixtures: the demo set, the base export

from training.config import load_config
from training.data import ShardDataset
from training.demo_data import find_face_landmarker
from training.shards import load_index, read_sample

pytestmark = [pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]


class RecordingSwapper:
    """Keeps each (source, target) it is handed and returns the source, so the filter sees a face."""

    def __init__(self):
        self.calls = []

    def swap(self, source, target):
        self.calls.append((source.copy(), target.copy()))
        return source.copy()


def stored(folder, key):
    """A demo sample's crop (RGB uint8, decoded from the shard) and its faceid and clip_image, by key."""
    import cv2

    for record in load_index(folder / "manifest.json"):
        for position, sample in enumerate(record["samples"]):
            if sample["key"] == key:
                raw = read_sample(record, position)
                field = "jpg" if "jpg" in raw else "png"
                crop = cv2.imdecode(np.frombuffer(raw[field], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                arrays = ShardDataset([record], ("faceid", "clip_image"), load_image=False)[position]
                return np.ascontiguousarray(crop), arrays["faceid"], arrays["clip_image"]
    raise KeyError(key)


def test_the_swapper_gets_the_render_of_the_portraits_identity_and_the_real_expression(demo, base_export, tmp_path):  # noqa: F811
    import torch

    from encoders.face_landmarks import FaceLandmarker
    from training.idi import IDI, load_clip_vision

    cfg = load_config("training/configs/emojidiff_idi_smoke.yaml",
                      [f"data.shards={demo / 'manifest.json'}", f"idi.adapter={base_export}", f"idi.out={tmp_path}",
                       "data.demo_if_missing=false", "idi.steps=2", "idi.max_exp_mean=1", "idi.max_lms=100"])
    swapper = RecordingSwapper()
    with FaceLandmarker(str(find_face_landmarker()), max_faces=1) as landmarker:
        idi = IDI(cfg, swapper, landmarker, load_clip_vision(cfg["idi"]))
        for row in (0, 5):
            _, outcome = idi.row(row)
            source, target = swapper.calls[-1]
            real_key = idi.frames.info(row)["key"]
            real_crop, real_faceid, real_clip = stored(demo, real_key)
            portrait_crop, portrait_faceid, portrait_clip = stored(demo, outcome["portrait"])
            assert outcome["portrait"] != real_key
            assert not torch.equal(real_faceid, portrait_faceid) and not torch.equal(real_clip, portrait_clip)
            # the source is P's crop, unchanged
            np.testing.assert_array_equal(source, portrait_crop)
            # the target is the render of P's identity with X's expression, at X's size
            assert target.shape == real_crop.shape and target.dtype == np.uint8
            size = real_crop.shape[0]
            np.testing.assert_array_equal(target, idi.render(portrait_faceid, real_clip, size, row))
            for faceid, clip_image in ((real_faceid, real_clip), (portrait_faceid, portrait_clip)):
                other = idi.render(faceid, clip_image, size, row)
                # (measured: about 17-20 levels on average for the identity, about 2 for the expression)
                assert np.abs(other.astype(int) - target.astype(int)).mean() > 0.5
