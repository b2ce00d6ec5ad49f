"""Metric functions on hand-made arrays: EmojiDiff's Exp and LMS (supplementary A), ID cosine, Exp-MSE, FID."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from training import metrics
from training.evaluate import format_table, pair, score_pair


def face(points: dict[int, tuple[float, float]]) -> np.ndarray:
    landmarks = np.zeros((478, 3))
    for index, (x, y) in points.items():
        landmarks[index, :2] = (x, y)
    return landmarks


# eye corners 33/133 (left) and 362/263 (right), lids 159/145 and 386/374, irises 468/473, mouth 61/291 and 0/17
REFERENCE = {33: (0, 0), 133: (4, 0), 159: (2, -1), 145: (2, 1), 468: (1, 0),
             362: (10, 0), 263: (16, 0), 386: (13, -0.5), 374: (13, 1), 473: (12, 0),
             61: (5, 10), 291: (11, 10), 0: (8, 9), 17: (8, 12)}


def test_lms_ratios_follow_the_supplementary_formula():
    ratios = metrics.lms_ratios(face(REFERENCE))
    expected = {"leye": 2 / 4, "lpupil": 3 / 4, "reye": 1.5 / 6, "rpupil": 4 / 6, "mouth": 3 / 6}
    for name, value in expected.items():
        np.testing.assert_allclose(ratios[name], [value], err_msg=name)


def test_lms_sums_absolute_ratio_differences():
    closed_mouth = REFERENCE | {17: (8, 9)}  # mouth ratio 0.5 -> 0
    looking_in = REFERENCE | {468: (3, 0)}  # left pupil ratio 0.75 -> 0.25
    generated = np.stack([face(REFERENCE), face(closed_mouth), face(looking_in), face(closed_mouth | {468: (3, 0)})])
    scores = metrics.lms_score(np.repeat(face(REFERENCE)[None], 4, axis=0), generated)
    np.testing.assert_allclose(scores, [0.0, 0.5, 0.5, 1.0])
    # ratios do not depend on where the face is or how large it is
    moved = face({k: (3 * x + 7, 3 * y - 2) for k, (x, y) in REFERENCE.items()})
    np.testing.assert_allclose(metrics.lms_score(face(REFERENCE), moved), [0.0], atol=1e-12)


def test_lms_guards_a_closed_eye_corner_and_uses_pixels_when_sizes_are_known():
    degenerate = face(REFERENCE | {133: (0, 0)})  # both corners on one point: denominator 1e-5
    ratios = metrics.lms_ratios(degenerate)
    np.testing.assert_allclose(ratios["leye"], [2 / 1e-5])
    # normalised coordinates of a 2:1 picture: x distances shrink by half unless the size is given
    normalised = face({k: (x / 2, y) for k, (x, y) in REFERENCE.items()})
    np.testing.assert_allclose(metrics.lms_score(face(REFERENCE), normalised, generated_size=(1, 2)), [0.0], atol=1e-12)
    assert metrics.lms_score(face(REFERENCE), normalised)[0] > 0.1
    with pytest.raises(ValueError, match="478"):
        metrics.lms_ratios(np.zeros((468, 3)))


def test_exp_is_the_sum_of_absolute_blendshape_differences():
    reference = np.zeros((2, 52))
    generated = np.zeros((2, 52))
    generated[0, [9, 10]] = [0.8, 0.3]  # eyeBlinkLeft, eyeBlinkRight
    generated[1, 25] = 0.6  # jawOpen
    reference[1, 25] = 0.9
    np.testing.assert_allclose(metrics.exp_score(reference, generated), [1.1, 0.3])
    with pytest.raises(ValueError, match="52"):
        metrics.exp_score(np.zeros(51), np.zeros(51))


def test_id_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(metrics.id_similarity(a, b), [1.0, -1.0])


def test_every_expression_column_reads_the_50_flame_expression_parameters():
    # one reading everywhere: SMIRK's first 50 parameters; the 2 eyelid and 3 jaw parameters never count
    target, generated = np.zeros((1, 55)), np.zeros((1, 55))
    generated[0, :2] = [1.0, 2.0]  # squared differences 1 + 4 = 5
    generated[0, 50:] = 9.0
    np.testing.assert_allclose(metrics.exp_mse(target, generated), [5 / 50])
    assert metrics.exp_rmse(target, generated) == pytest.approx(np.sqrt(5.0))  # one picture: its l2 distance
    row = score_pair({"flame": generated[0]}, {"flame": target[0]})
    assert row == {"exp_mse": pytest.approx(0.1)}
    from training.evaluate import diversity

    samples = [{"flame": np.r_[np.zeros(50), np.zeros(5)]}, {"flame": np.r_[np.full(50, 4.0), np.full(5, 100.0)]}]
    assert diversity({"anna": samples}, {})["exp_std"]["mean"] == pytest.approx(2.0)  # std of {0, 4}


def test_fid_wiring_through_torchmetrics_gives_hand_computed_distances():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 0.7]])
    assert metrics.fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)
    # a shifted copy has the same covariance: only |shift|^2 = 1 + 4 + 4 remains
    assert metrics.fid_from_features(features, features + [1.0, 2.0, 2.0]) == pytest.approx(9.0, rel=1e-6)
    # twice the centred features: covariance 4S, so tr(S + 4S - 2 sqrt(4 S^2)) = tr(S)
    centred = features - features.mean(0)
    assert metrics.fid_from_features(centred, 2 * centred) == pytest.approx(np.trace(np.cov(centred, rowvar=False)), rel=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        metrics.fid_from_features(features[:1], features)


def test_fid_without_inception_weights_says_what_to_give(tmp_path):
    with pytest.raises(metrics.InceptionWeightsMissing, match="--inception-weights"):
        metrics.InceptionFeatures(None)
    with pytest.raises(metrics.InceptionWeightsMissing, match="--inception-weights"):
        metrics.InceptionFeatures(tmp_path / "absent.pth")
    with pytest.raises(metrics.InceptionWeightsMissing, match="pt_inception-2015-12-05"):
        metrics.InceptionFeatures(tmp_path / "absent.pth", backend="fid-inception")


def test_pairing_by_name_accepts_comfyui_counters_and_scores_what_both_sides_have(tmp_path):
    names = ["a_00001_.png", "b.png", "c_00003_.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    paths = sorted(tmp_path.iterdir())
    entries = [{"generated": "b"}, {"generated": "a.png"}, {"generated": "zzz"}]
    matched = pair(paths, entries, "name")
    assert [(p.name, e["generated"]) for p, e in matched] == [("b.png", "b"), ("a_00001_.png", "a.png")]
    with pytest.raises(SystemExit, match="3 generated pictures but 2 targets"):
        pair(paths, entries[:2], "order")
    row = score_pair({"id_embedding": np.ones(4), "flame": np.zeros(55), "image_size": (64, 64)},
                     {"id_embedding": np.ones(4), "blendshapes": np.zeros(52), "flame": np.ones(55)})
    assert row == {"id_similarity": pytest.approx(1.0), "exp_mse": pytest.approx(1.0)}
    summary = {"metrics": metrics.summarise([row, {"id_similarity": 0.5}], ["id_similarity", "exp_mse"])}
    assert summary["metrics"]["id_similarity"] == {"mean": 0.75, "std": 0.25, "count": 2}
    assert "| exp_mse | 1.0000 | 0.0000 | 1 |" in format_table(summary)
    json.dumps(summary)


def test_facecrafter_columns_on_hand_made_arrays():
    target = np.array([[0.5, 0.2, 1, 0, 0, 0, 0, 0, 0, 0], [-0.4, 0.6, 0, 0, 1, 0, 0, 0, 0, 0]])
    generated = np.array([[0.2, 0.2, 0.5, 0.5, 0, 0, 0, 0, 0, 0], [-0.4, 0.0, 0, 0, 1, 0, 0, 0, 0, 0]])
    errors = metrics.emotion_errors(target, generated)
    assert errors["v_rmse"] == pytest.approx(np.sqrt((0.3 ** 2 + 0) / 2))
    assert errors["a_rmse"] == pytest.approx(np.sqrt((0 + 0.6 ** 2) / 2))
    assert errors["dist_rmse"] == pytest.approx(np.sqrt((0.25 + 0.25 + 0) / 2))  # |(0.5, -0.5)|^2 = 0.5
    assert errors["class_acc"] == pytest.approx(100.0)  # argmax ties go to the first class: both agree
    generated[1, 4], generated[1, 6] = 0.2, 0.8
    assert metrics.emotion_errors(target, generated)["class_acc"] == pytest.approx(50.0)
    flame_t, flame_g = np.zeros((2, 55)), np.zeros((2, 55))
    flame_g[0, :4] = 1.0  # |d|^2 = 4 on the first picture
    flame_g[:, 50:] = 9.0  # eyelid and jaw are not expression parameters
    assert metrics.exp_rmse(flame_t, flame_g) == pytest.approx(np.sqrt(2.0))
    assert metrics.pose_rmse([[0, 0, 0], [0, 0, 0]], [[180, 0, 0], [0, 0, 0]]) == pytest.approx(np.pi / np.sqrt(2))
    assert metrics.parameter_std([[0, 1], [2, 1]]) == pytest.approx(0.5)  # stds 1 and 0
    assert metrics.mean_pairwise([1, 2, 4], lambda a, b: abs(a - b)) == pytest.approx((1 + 3 + 2) / 3)


def test_lpips_with_a_supplied_backbone_file(tmp_path):
    pytest.importorskip("lpips")
    import torch
    from torchvision.models import alexnet

    with pytest.raises(metrics.OptionalMetricMissing, match="--lpips-backbone"):
        metrics.lpips_distance(tmp_path / "absent.pth")
    torch.manual_seed(0)
    torch.save(alexnet(weights=None).state_dict(), tmp_path / "alexnet.pth")  # stand-in backbone weights
    distance = metrics.lpips_distance(tmp_path / "alexnet.pth")
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    assert distance(a, a) == pytest.approx(0.0, abs=1e-7) and distance(a, b) > 0
    assert distance(a, b) == pytest.approx(distance(b, a), rel=1e-5)


def test_liqe_without_pyiqa_or_weights_says_what_to_give(tmp_path, monkeypatch):
    with pytest.raises(metrics.OptionalMetricMissing, match="--liqe-weights"):
        metrics.liqe_scorer(tmp_path / "absent.pt")
    # the weights alone: pyiqa would try to download OpenAI's CLIP ViT-B/32 into torch hub's folder
    (tmp_path / "LIQE.pt").write_bytes(b"")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(metrics.OptionalMetricMissing, match=re.escape(str(tmp_path / "torch_home" / "hub" / "clip" / "ViT-B-32.pt"))):
        metrics.liqe_scorer(tmp_path / "LIQE.pt")


def test_evaluation_set_columns_diversity_and_paper_table():
    from training.evaluate import diversity, set_metrics
    from training.paper_tables import paper_table

    emotion = np.array([0.5, 0.2, 1, 0, 0, 0, 0, 0, 0, 0])
    pairs = [({"emotion": emotion, "head_pose": np.zeros(3)}, {"emotion": emotion + [0.3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                                                                 "head_pose": np.array([0.0, 90.0, 0.0])}),
             ({"emotion": emotion}, {"emotion": emotion})]
    columns = set_metrics(pairs)
    assert columns["v_rmse"]["value"] == pytest.approx(np.sqrt(0.09 / 2)) and columns["v_rmse"]["count"] == 2
    assert columns["pose_rmse"] == {"value": pytest.approx(np.pi / 2), "count": 1}
    assert "exp_rmse" not in columns  # no pair has flame on both sides
    groups = {"anna": [{"flame": np.r_[np.zeros(50), 5.0 * np.ones(5)]}, {"flame": np.r_[2 * np.ones(50), np.zeros(5)]}],
              "ben": [{"flame": np.zeros(55)}]}  # one sample: no diversity
    images = {"anna": [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]}
    found = diversity(groups, images, lpips=lambda a, b: float(np.abs(a.astype(float) - b).mean()))
    assert found["exp_std"] == {"mean": pytest.approx(1.0), "std": 0.0, "count": 1}  # std of {0, 2}, jaw ignored
    assert found["lpips"]["mean"] == pytest.approx(255.0) and "pose_std" not in found
    table = paper_table("facecrafter", {"metrics": {"v_rmse": {"value": 0.2}, "id_similarity": {"mean": 0.7}}})
    assert "| FaceCrafter (LMK+EMO) (paper) | 6.81 | 0.126 | 0.217 | 0.184 | 0.52 | 61.2 | 0.69 | 41.54 |" in table
    assert "| ours |  |  | 0.2 |  |  |  | 0.7 |  |" in table
    assert "SMIRK" in table and "FaceNet" in table and "not computed here: Exp-RMSE, Pose-RMSE" in table
    spread = paper_table("facecrafter-diversity", {"metrics": found})
    assert "| FaceCrafter, AgeDB-500 (paper) | 0.589 | 6.93 | 0.424 | 6.501 |" in spread
    assert "| ours | 255 | 1 |  |  |" in spread and "not computed here: Pose-std, FID" in spread
    emojidiff = paper_table("emojidiff", {"metrics": {"exp_mean": {"mean": 0.06}}})
    assert "| EmojiDiff (paper) | 0.666 | 4.995 | 0.054 | 0.215 |" in emojidiff and "| ours |  |  | 0.06 |  |" in emojidiff


# --- on real landmarks and blendshapes from the real MediaPipe model -------------------------------------

def moved_pictures(images):
    """The same pictures 10% larger and shifted a little: the same faces with the same expressions."""
    import cv2

    matrix = np.float32([[1.1, 0, -12], [0, 1.1, -8]])
    pictures = (images.numpy() * 255).round().astype(np.uint8)
    return [cv2.warpAffine(p, matrix, p.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
            for p in pictures]


def test_exp_and_lms_on_real_faces_from_the_real_model(real_faces, mediapipe_task):
    import mediapipe as mp

    from encoders.expressions import ARKIT_BLENDSHAPE_NAMES

    vision = mp.tasks.vision
    options = vision.FaceLandmarkerOptions(base_options=mp.tasks.BaseOptions(model_asset_path=str(mediapipe_task)),
                                           output_face_blendshapes=True, num_faces=1)
    with vision.FaceLandmarker.create_from_options(options) as task:
        raw = [task.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=picture))
               for picture in moved_pictures(real_faces.images)]
    moved_landmarks = np.array([[[p.x, p.y, p.z] for p in result.face_landmarks[0]] for result in raw])
    moved_scores = [{c.category_name: c.score for c in result.face_blendshapes[0]} for result in raw]
    original = real_faces.result.blendshapes.values.numpy()
    exp = metrics.exp_score(original, np.array([[s[name] for name in ARKIT_BLENDSHAPE_NAMES] for s in moved_scores]))
    # eq. 1 by hand, by category name, on MediaPipe's own output for the moved pictures
    by_hand = [sum(abs(float(original[i, ARKIT_BLENDSHAPE_NAMES.index(name)]) - score) for name, score in s.items())
               for i, s in enumerate(moved_scores)]
    np.testing.assert_allclose(exp, by_hand, rtol=1e-6)
    other_face = metrics.exp_score(original[0], original[1])[0]
    assert exp.max() < 0.3 * other_face  # the same expression scores far below another person's

    landmarks = real_faces.result.landmarks
    lms = metrics.lms_score(landmarks.values.numpy(), moved_landmarks, landmarks.image_size, landmarks.image_size)
    assert lms.max() < 0.18  # passes EmojiDiff's "same expression" filter (supplementary B.1)
    # eq. 2 by hand on pixel coordinates (Landmarks.pixels) for the mouth of each face
    pixels = landmarks.pixels().numpy()
    mouth = [np.hypot(*(p[17, :2] - p[0, :2])) / np.hypot(*(p[291, :2] - p[61, :2])) for p in pixels]
    np.testing.assert_allclose(metrics.lms_ratios(landmarks.values.numpy(), landmarks.image_size)["mouth"], mouth,
                               rtol=1e-5)
    assert min(mouth) > 0.2  # both t1 faces smile with open lips
