"""The smoke config runs from a fresh clone: missing data becomes a small demo set, logged as such.

The demo set uses pictures shipped inside installed packages (insightface's t1.jpg and
Tom_Hanks_54745.png, scikit-image's astronaut) with fixed face crops and stand-in models, so it
needs neither the shared test data nor downloads. Where the real MediaPipe model is cached, it
annotates landmarks, which also shows that the fixed crops hold faces.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.config import ConfigError, load_config
from training.data import ShardDataset
from training.demo_data import DEMO_FACES, find_face_landmarker
from training.shards import load_index
from training.train import main as train_main

pytest.importorskip("timm")
pytestmark = [pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]
SMOKE = "training/configs/smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, mediapipe_task):
    """The smoke config on a missing data set: the demo set is built (with landmarks from the real MediaPipe
    model, which the ``mediapipe_task`` fixture has put in the test cache) and trained on."""
    assert find_face_landmarker() == mediapipe_task
    root = tmp_path_factory.mktemp("fresh_clone")
    manifest = root / "smoke_data" / "manifest.json"
    result = train_main(["--config", SMOKE, "--set", f"data.shards={manifest}", "--set", f"output_dir={root / 'smoke'}",
                         "--set", "train.max_steps=3", "--set", "logging.progress_bar=false",
                         "--set", "sampling.every_steps=0"])
    return manifest, result


def test_missing_smoke_data_is_built_as_a_demo_set_then_trained(smoke_run):
    manifest_path, result = smoke_run
    manifest = json.loads(manifest_path.read_text())
    assert manifest["settings"]["demo"] is True
    assert any(note.startswith("demo data:") for note in manifest["notes"])
    # every face and its mirror: 2 samples per person
    assert manifest["num_samples"] == 2 * len(DEMO_FACES)
    persons = [s["person_id"] for r in load_index(manifest_path) for s in r["samples"]]
    assert sorted(set(persons)) == sorted(person for _, _, person in DEMO_FACES)
    assert all(persons.count(p) == 2 for p in set(persons))
    assert {"id.npy", "flame.npy", "latent_mean.npy", "latent_std.npy"} <= set(manifest["fields"])
    # then the run trained on it and exported
    assert result.step == 3 and all(np.isfinite(list(result.losses.values())))
    assert result.export_path.is_file()


def test_demo_crops_hold_faces_for_the_real_landmarker(smoke_run):
    manifest_path, _ = smoke_run
    dataset = ShardDataset(load_index(manifest_path), ["landmarks"], load_image=False)
    assert len(dataset) == 2 * len(DEMO_FACES) and not dataset.missing
    for index in range(len(dataset)):
        points = dataset[index]["landmarks"][:, :2].numpy()
        # the face fills the middle of the crop: the crop is 1.8 x the face box, centred on it
        centre = points.mean(0)
        assert np.all(np.abs(centre - 0.5) < 0.15), (index, centre)
        assert 0.25 < float(np.ptp(points[:, 0])) < 0.8


def test_demo_head_poses_mirror_with_the_pictures(smoke_run):
    manifest_path, _ = smoke_run
    dataset = ShardDataset(load_index(manifest_path), ["head_pose", "face_mask"], load_image=False)
    poses = {}
    for index in range(len(dataset)):
        meta = dataset[index]["meta"]
        poses[(meta["person_id"], meta["mirrored"])] = dataset[index]["head_pose"].numpy()
        assert 0.08 < float(dataset[index]["face_mask"].float().mean()) < 0.6  # face box ~ 1/1.8 of the crop side
    for person in {p for p, _ in poses}:
        plain, mirrored = poses[(person, False)], poses[(person, True)]
        # a mirror negates yaw and roll and keeps pitch (encoders.head_pose); MediaPipe is not exactly symmetric
        np.testing.assert_allclose(mirrored * [-1, 1, -1], plain, atol=8.0, err_msg=person)  # 64-pixel crops
    assert max(abs(p[0]) for p in poses.values()) > 10  # some faces are turned: the test is not all zeros


def test_configs_without_the_demo_switch_still_stop_on_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="absent.json, which does not exist"):
        load_config(SMOKE, [f"data.shards={tmp_path / 'absent.json'}", "data.demo_if_missing=false"])
