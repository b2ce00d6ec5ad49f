"""training.prepare's optional fields: person_id, a second recogniser's faceid, head pose, the EmojiDiff
local image and its CLIP embedding, EmoNet emotion and the face mask.

Head pose and the face mask are checked against hand-derived numbers; the prepare run uses stand-in
face models (tiny ONNX recognisers, random EmoNet and CLIP vision) and the real MediaPipe model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from encoders.head_pose import head_pose_from_matrix
from support.training_helpers import PreparedModels, write_pictures
from training.annotate import face_oval_mask
from training.data import ShardDataset
from training.prepare import main as prepare
from training.shards import load_index, read_member

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


def rotation(yaw, pitch, roll):
    """Rz(roll) Ry(yaw) Rx(pitch), each written out by hand."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_head_pose_from_hand_built_matrices():
    # a pure 30 degree turn about y: [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    turn = np.eye(4)
    turn[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    turn[:3, 3] = [1.0, -2.0, -40.0]  # translation does not matter
    np.testing.assert_allclose(head_pose_from_matrix(turn), [30, 0, 0], atol=1e-9)
    # combined angles come back, also with a uniform scale in the matrix, and batched
    matrices = np.stack([np.pad(2.5 * rotation(*a), ((0, 1), (0, 1))) for a in [(20, -10, 5), (-35, 15, -8)]])
    np.testing.assert_allclose(head_pose_from_matrix(matrices), [[20, -10, 5], [-35, 15, -8]], atol=1e-9)
    # a mirror image (x -> -x in camera space) negates yaw and roll, keeps pitch
    flip = np.diag([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(head_pose_from_matrix(flip @ rotation(20, -10, 5) @ flip), [-20, -10, -5], atol=1e-9)
    with pytest.raises(ValueError, match="4 x 4"):
        head_pose_from_matrix(np.eye(2))


def test_face_oval_mask_fills_the_polygon():
    from encoders.face_mesh import REGION_POLYLINES

    oval = REGION_POLYLINES["face_oval"][0][:-1]
    landmarks = np.zeros((478, 3))
    angles = np.linspace(0, 2 * np.pi, len(oval), endpoint=False)
    landmarks[list(oval), 0] = 0.5 + 0.25 * np.cos(angles)
    landmarks[list(oval), 1] = 0.5 + 0.25 * np.sin(angles)
    mask = face_oval_mask(np.zeros((400, 400, 3), np.uint8), landmarks)
    # a regular 36-gon of radius r covers (36 / 2) r^2 sin(10 degrees) of the unit square
    assert mask.mean() == pytest.approx(18 * 0.25 ** 2 * math.sin(math.radians(10)), abs=0.004)
    assert mask[200, 200] and not mask[5, 5] and not mask[200, 90]


def write_tiny_clip_vision(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(folder)
    return model


def write_tiny_emonet(path):
    from encoders.emotion import EmoNet

    torch.manual_seed(0)
    torch.save(EmoNet(stem=8, width=16, fc_hidden=16).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mediapipe_task):
    pytest.importorskip("timm")
    landmarker = mediapipe_task
    root = tmp_path_factory.mktemp("fields")
    models = PreparedModels(root)
    if models.insightface is None:
        pytest.skip("shared/testdata/t1_faces.npz (the stand-in detector's faces) not found")
    from support.onnx_face_models import export_recognizer

    faceid = root / "w600k_r50.onnx"
    export_recognizer(faceid, seed=1)
    # t1.jpg and two photometric variants (the stand-in detector's faces are t1's, so geometry must stay). Not the
    # blurred variant: on FFHQ-aligned crops MediaPipe finds no face in it, and prepare rightly skips it.
    import cv2

    pictures = [p for p in write_pictures(root / "pictures") if p.name in ("a_t1.png", "b_t1_bright.png")]
    dark = root / "pictures" / "c_t1_dark.png"
    cv2.imwrite(str(dark), cv2.convertScaleAbs(cv2.imread(str(pictures[0])), alpha=0.85, beta=0))
    pictures.append(dark)
    (root / "persons.txt").write_text("pictures/a_t1.png,rachel\npictures/b_t1_bright.png,rachel\n")
    clip = write_tiny_clip_vision(root / "clip_vision")
    emonet = write_tiny_emonet(root / "emonet_8.pth")
    out = root / "shards"
    prepare(models.prepare_args(pictures, out, "--landmarker", str(landmarker), "--person-list", str(root / "persons.txt"),
                                "--faceid-recognizer", str(faceid), "--head-pose", "--clip-vision", str(root / "clip_vision"),
                                "--emonet", str(emonet), "--face-mask", "--mask-size", "16"))
    return out, clip


def test_prepare_writes_the_optional_fields(prepared):
    out, clip = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"faceid.npy", "head_pose.npy", "local.jpg", "clip_image.npy", "emotion.npy", "face_mask.npy"} <= set(manifest["fields"])
    records = load_index(out / "manifest.json")
    persons = [s.get("person_id") for r in records for s in r["samples"]]
    assert persons == ["rachel", "rachel", None]  # the list names two of the three pictures
    data = ShardDataset(records, ["id", "faceid", "head_pose", "clip_image", "emotion", "face_mask"], load_image=False)
    assert len(data) == 3
    for index in range(3):
        sample = data[index]
        assert sample["faceid"].shape == (512,) and sample["id"].shape == (16,)  # two recognisers, two spaces
        assert float(sample["faceid"].norm()) == pytest.approx(1.0, abs=1e-5)
        assert sample["head_pose"].shape == (3,) and bool((sample["head_pose"].abs() < 90).all())
        emotion = sample["emotion"]
        assert emotion.shape == (10,) and float(emotion[2:].sum()) == pytest.approx(1.0, abs=1e-5)
        mask = sample["face_mask"]
        assert mask.shape == (16, 16) and 0.15 < float(mask.mean()) < 0.9 and mask[8, 8] == 1
    # the CLIP embedding is the frozen encoder's image_embeds of the stored local image
    import cv2

    from training.annotate import clip_image_embeds

    info = records[0]["samples"][0]
    local = cv2.imdecode(np.frombuffer(read_member(records[0]["path"], *info["members"]["local.jpg"]), np.uint8),
                         cv2.IMREAD_COLOR)[:, :, ::-1]
    assert local.shape == (224, 224, 3)
    with torch.no_grad():
        expected = clip_image_embeds(clip, torch.from_numpy(local.copy()).float()[None] / 255)[0]
    torch.testing.assert_close(data[0]["clip_image"], expected, atol=0.05, rtol=0)  # local.jpg is lossy


def test_prepare_takes_its_process_split_from_torchrun(monkeypatch):
    from training.prepare import parse_args

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    args = parse_args(["in", "--out", "o", "--insightface", "f", "--smirk", "s"])
    assert (args.num_processes, args.process_index) == (4, 3)
    args = parse_args(["in", "--out", "o", "--insightface", "f", "--smirk", "s", "--num-processes", "2", "--process-index", "0"])
    assert (args.num_processes, args.process_index) == (2, 0)
