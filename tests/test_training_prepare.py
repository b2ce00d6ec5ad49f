"""training.prepare on real pictures with tiny official-format face and SMIRK models.

Checks the shard format (a plain tar any WebDataset reader groups by key), that unreadable files
and faceless pictures are skipped and counted, that an interrupted run resumes without
duplicates, that video frames keep their clip id and time, and the shard split across processes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from support.training_helpers import PreparedModels, write_clip, write_pictures
from training.data import ShardDataset
from training.prepare import main as prepare
from training.shards import load_index, read_member

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    models = PreparedModels(tmp_path_factory.mktemp("prepare_models"))
    if models.insightface is None:
        pytest.skip("shared/testdata/t1_faces.npz (the stand-in detector's faces) not found")
    return models


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import cv2

    folder = tmp_path_factory.mktemp("inputs")
    pictures = write_pictures(folder)[:3]
    for extra in sorted(folder.glob("*.png"))[3:]:
        extra.unlink()
    (folder / "c2_corrupt.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    cv2.imwrite(str(folder / "c3_black.png"), np.zeros((64, 64, 3), np.uint8))  # the detector sees no face here
    return folder, pictures


def shard_keys(out) -> list[str]:
    keys = []
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as handle:
            keys += sorted({name.split(".")[0] for name in handle.getnames()})
    return keys


def test_prepare_skips_bad_files_counts_them_and_resumes(models, inputs, tmp_path):
    folder, pictures = inputs
    out = tmp_path / "shards"
    done = []
    first = prepare(models.prepare_args([folder], out, "--items-per-shard", "2", "--max-shards", "1"))
    done.append(first["shards_done"])
    assert first["shards_done"] == 1 and first["shards_total"] == 3
    assert not (out / "manifest.json").exists()  # not finished: training cannot pick up half a dataset
    # a crash in the middle of a shard leaves only a .partial file, which the rerun replaces
    (out / "shard-000001.tar.partial").write_bytes(b"half a shard")
    second = prepare(models.prepare_args([folder], out, "--items-per-shard", "2"))
    assert second["shards_done"] == 3 and not list(out.glob("*.partial"))
    assert second["skipped"] == {"corrupt": 1, "no_face": 1}
    assert {Path(e["source"]).name: e["reason"] for e in second["skipped_files"]} == {
        "c2_corrupt.jpg": "corrupt", "c3_black.png": "no_face"}
    keys = shard_keys(out)
    assert len(keys) == len(set(keys)) == 3 == second["samples"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 3 and manifest["vae"] is None
    assert set(manifest["fields"]) == {"jpg", "json", "id.npy", "flame.npy"}
    assert any("no --landmarker" in note for note in manifest["notes"])
    # a third run finds nothing to do and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    prepare(models.prepare_args([folder], out, "--items-per-shard", "2"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before


def test_sample_contents_and_dataset_reading(models, inputs, tmp_path):
    folder, pictures = inputs
    out = tmp_path / "shards"
    prepare(models.prepare_args(pictures, out, "--items-per-shard", "8", "--vae", str(models.vae)))
    dataset = ShardDataset(load_index(out / "manifest.json"), ("id", "flame"), resolution=64, load_latents=True)
    assert len(dataset) == 3
    sample = dataset[0]
    assert sample["pixels"].shape == (3, 64, 64) and -1.0 <= float(sample["pixels"].min()) < float(sample["pixels"].max()) <= 1.0
    assert sample["id"].shape == (16,) and abs(float(sample["id"].norm()) - 1.0) < 1e-5
    assert sample["flame"].shape == (55,) and 0.0 <= float(sample["flame"][50:52].min()) <= float(sample["flame"][50:52].max()) <= 1.0
    assert sample["latent_mean"].shape == sample["latent_std"].shape == (4, 8, 8)
    assert sample["meta"]["source"].endswith("a_t1.png") and sample["meta"]["faces_found"] == 3
    assert sample["meta"]["smirk_crop"] == "detector_box"
    # the same bytes as a plain tar reader sees them
    with tarfile.open(out / "shard-000000.tar") as handle:
        stored = np.load(io.BytesIO(handle.extractfile(f"{sample['key']}.flame.npy").read()))
    np.testing.assert_array_equal(stored, sample["flame"].numpy())
    # landmarks were not produced: asking for them is a clear error, not a crash mid-epoch
    with pytest.raises(ValueError, match=r"landmarks/blendshapes need prepare --landmarker"):
        ShardDataset(load_index(out), ("id", "flame", "blendshapes"))


def test_video_frames_keep_clip_and_time_and_processes_split_shards(models, inputs, tmp_path):
    folder, pictures = inputs
    clip = write_clip(tmp_path / "clip.avi", frames=6, fps=10.0)
    out = tmp_path / "shards"
    items = [clip, *pictures]
    # two "machines": shards 0 and 2 for process 0, shard 1 for process 1
    for index in (0, 1):
        prepare(models.prepare_args(items, out, "--items-per-shard", "1", "--num-processes", "2",
                                    "--process-index", str(index), "--video-frame-step", "2"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4
    records = load_index(out / "manifest.json")
    video = next(r for r in records if any(s.get("clip_id") for s in r["samples"]))
    assert [s["time_s"] for s in video["samples"]] == [0.0, 0.2, 0.4]
    assert len({s["clip_id"] for s in video["samples"]}) == 1
    dataset = ShardDataset(records, ("id", "flame"), resolution=64)
    first = next(i for i in range(len(dataset)) if dataset.info(i).get("clip_id"))
    assert len(dataset.clip_partners(first, window_s=2.0)) == 2
    assert len(dataset.clip_partners(first, window_s=0.3)) == 1
    frames = Counter(dataset[i]["meta"]["frame_index"] for i in range(len(dataset)) if dataset.info(i).get("clip_id"))
    assert sorted(frames) == [0, 2, 4]


def test_evaluate_scores_a_comfyui_style_folder_against_prepared_targets(models, inputs, tmp_path):
    import csv

    import cv2

    from training.evaluate import main as evaluate

    folder, pictures = inputs
    out = tmp_path / "shards"
    prepare(models.prepare_args(pictures, out, "--items-per-shard", "8"))
    generated = tmp_path / "generated"
    generated.mkdir()
    # stand-ins for generated pictures: the source pictures, saved under the targets' keys with ComfyUI's counter
    for record in load_index(out / "manifest.json"):
        for sample in record["samples"]:
            source = json.loads(read_member(record["path"], *sample["members"]["json"]))["source"]
            cv2.imwrite(str(generated / f"{sample['key']}_00001_.png"), cv2.imread(source))
    summary = evaluate(["--generated", str(generated), "--targets", str(out / "manifest.json"), "--out", str(tmp_path / "eval"),
                        "--insightface", str(models.insightface), "--smirk", str(models.smirk), "--provider", "cpu",
                        "--real", str(folder)])
    assert summary["pairs"] == 3 and summary["failed"] == 0
    # the same picture, the same face models: identity and expression come back as prepared
    assert summary["metrics"]["id_similarity"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert set(summary["metrics"]) == {"id_similarity", "exp_mse", "exp_rmse"}  # exp_rmse: FaceCrafter's set-level column
    assert any("--landmarker" in note for note in summary["notes"]) and any("FID left out" in note for note in summary["notes"])
    with open(tmp_path / "eval" / "per_sample.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["generated"].split("_")[0] for row in rows] == [row["target"].split("_")[0] for row in rows]
    assert all(float(row["exp_mse"]) >= 0.0 for row in rows)


def test_a_sample_damaged_after_prepare_is_replaced_not_fatal(models, inputs, tmp_path):
    folder, pictures = inputs
    out = tmp_path / "shards"
    prepare(models.prepare_args(pictures, out, "--items-per-shard", "8"))
    records = load_index(out)
    tar = Path(records[0]["path"])
    first_image = records[0]["samples"][0]["members"]["jpg"]
    data = bytearray(tar.read_bytes())
    data[first_image[0]:first_image[0] + first_image[1]] = b"\0" * first_image[1]  # the JPEG bytes wiped
    tar.write_bytes(bytes(data))
    dataset = ShardDataset(records, ("id", "flame"), resolution=64)
    assert dataset[0]["key"] == records[0]["samples"][1]["key"] and dataset.unreadable == 1


def test_landmark_annotation_with_the_real_mediapipe_model(models, inputs, mediapipe_task, tmp_path):
    """The faces come from the stand-in detector (the test data's t1.jpg boxes); MediaPipe is Google's real
    model. Its landmarks on the aligned crop must match the test data's mesh of that face, mapped into the
    crop by the stored crop matrix; SMIRK then crops around them."""
    from support.onnx_face_models import TESTDATA

    folder, pictures = inputs
    resolution = 256
    out = tmp_path / "shards"
    summary = prepare(models.prepare_args(pictures[:1], out, "--landmarker", str(mediapipe_task), "--resolution",
                                          str(resolution)))
    assert summary["samples"] == 1 and not summary["skipped"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"landmarks.npy", "blendshapes.npy"} <= set(manifest["fields"])
    [sample] = [ShardDataset(load_index(out), ("landmarks", "blendshapes", "flame"), load_image=False)[0]]
    assert sample["meta"]["smirk_crop"] == "landmarks"
    landmarks, blendshapes = sample["landmarks"].numpy(), sample["blendshapes"].numpy()
    assert landmarks.shape == (478, 3) and blendshapes.shape == (52,)
    assert 0.0 <= blendshapes.min() and blendshapes.max() <= 1.0 and blendshapes.max() > 0.3

    faces = np.load(TESTDATA / "t1_faces.npz")
    largest = int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in faces["boxes"]]))  # face_index 0
    height, width = 886, 1280  # t1.jpg
    reference = faces["lm478"][largest, :, :2] * [width, height]
    matrix = np.asarray(sample["meta"]["crop_matrix"])
    expected = reference @ matrix[:, :2].T + matrix[:, 2]
    errors = np.linalg.norm(landmarks[:, :2] * resolution - expected, axis=-1)
    # a few pixels, as between the two runs on t1.jpg itself (the crop enlarges the face about 1.2x)
    assert np.median(errors) < 5.0 and errors.mean() < 6.0, errors.mean()


def test_liqe_filter_drops_pictures_below_the_threshold_before_the_face_step(models, inputs, tmp_path, monkeypatch):
    """EmojiDiff's LIQE cleaning with a stand-in scorer (LIQE's own weights cannot be fetched here): the
    picture's mean brightness / 51, a 0..5 score computed by hand from the input files below."""
    import cv2

    import training.metrics

    folder, pictures = inputs
    weights = tmp_path / "LIQE.pt"
    weights.write_bytes(b"stand-in")
    seen = []

    def standin_liqe(path, device="cpu"):
        seen.append((str(path), device))
        return lambda rgb: float(rgb.mean()) / 51

    monkeypatch.setattr(training.metrics, "liqe_scorer", standin_liqe)
    scores = {p.name: float(cv2.imread(str(p)).mean()) / 51 for p in pictures}
    threshold = float(np.mean(sorted(scores.values())[:2]))  # between the two lowest: one real picture fails
    out = tmp_path / "shards"
    summary = prepare(models.prepare_args([folder], out, "--min-liqe", str(threshold), "--liqe-weights", str(weights)))
    assert seen == [(str(weights), "cpu")]
    kept = {name for name, score in scores.items() if score >= threshold}
    assert len(kept) == 2
    # the black picture (score 0) is dropped for quality before the detector could call it faceless
    assert summary["skipped"] == {"low_quality": 2, "corrupt": 1}
    dataset = ShardDataset(load_index(out / "manifest.json"), (), resolution=64, load_image=False)
    stored = {Path(dataset[i]["meta"]["source"]).name: dataset[i]["meta"]["liqe"] for i in range(len(dataset))}
    assert stored == pytest.approx({name: scores[name] for name in kept}, abs=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert {Path(e["source"]).name for e in report["skipped_files"] if e["reason"] == "low_quality"} == \
        {"c3_black.png"} | (set(scores) - kept)


def test_liqe_filter_says_which_file_is_missing(models, inputs, tmp_path, monkeypatch):
    """The real loader (training.metrics.liqe_scorer) stops the run with a message naming what to provide."""
    folder, pictures = inputs
    with pytest.raises(SystemExit, match=r"--min-liqe needs --liqe-weights"):
        prepare(models.prepare_args(pictures[:1], tmp_path / "a", "--min-liqe", "3"))
    with pytest.raises(SystemExit, match=r"LIQE needs its weights file"):
        prepare(models.prepare_args(pictures[:1], tmp_path / "b", "--min-liqe", "3", "--liqe-weights", str(tmp_path / "no.pt")))
    weights = tmp_path / "LIQE.pt"
    weights.write_bytes(b"stand-in")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(SystemExit, match=r"CLIP ViT-B-32\.pt at .*torch_home"):
        prepare(models.prepare_args(pictures[:1], tmp_path / "c", "--min-liqe", "3", "--liqe-weights", str(weights)))


# CelebAMask-HQ's face labels, listed by hand from facexlib's label names: skin, both brows, both eyes, glasses,
# nose, mouth, both lips (ears, earrings, neck, necklace, cloth, hair, hat and background are not face)
FACE_LABELS = [1, 2, 3, 4, 5, 6, 10, 11, 12, 13]


def facexlib_face_mask(network, crop, mean, std):
    """The face labels of facexlib's network called directly on the crop as facexlib's callers feed it."""
    import cv2
    import torch

    resized = cv2.resize(crop, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    pixels = torch.from_numpy((resized - np.float32(mean)) / np.float32(std)).permute(2, 0, 1)[None]
    with torch.no_grad():
        labels = network(pixels)[0].argmax(1)[0].numpy().astype(np.uint8)
    labels = cv2.resize(labels, crop.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    return np.isin(labels, FACE_LABELS)


def test_face_parsing_mask_from_a_local_bisenet_file(models, inputs, tmp_path):
    """prepare --face-parser bisenet: facexlib's BiSeNet at its published size (random weights saved as the
    .pth users have), no landmarks needed; the stored mask is the area-downsampled face labels."""
    import cv2
    import torch
    from facexlib.parsing.bisenet import BiSeNet

    from training.shards import read_sample

    folder, pictures = inputs
    torch.manual_seed(0)
    network = BiSeNet(num_class=19).eval()
    weights = tmp_path / "parsing_bisenet.pth"
    torch.save(network.state_dict(), weights)
    out = tmp_path / "shards"
    summary = prepare(models.prepare_args(pictures[:1], out, "--face-mask", "--face-parser", "bisenet",
                                          "--face-parsing-model", str(weights), "--mask-size", "16",
                                          "--image-format", "png"))
    assert summary["samples"] == 1
    record = load_index(out)[0]
    files = read_sample(record, 0)
    crop = cv2.imdecode(np.frombuffer(files["png"], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    stored = np.load(io.BytesIO(files["face_mask.npy"]))
    full = facexlib_face_mask(network, np.ascontiguousarray(crop), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = full.reshape(16, 4, 16, 4).mean((1, 3)) >= 0.5  # 64-pixel crop, 4 x 4 pixels a cell
    assert 0 < expected.mean() < 1
    np.testing.assert_array_equal(stored, expected.astype(np.uint8))
    # BiSeNet's own normalisation matters: ParseNet's would parse this crop otherwise
    assert (facexlib_face_mask(network, np.ascontiguousarray(crop), (0.5,) * 3, (0.5,) * 3) != full).any()

    with pytest.raises(FileNotFoundError, match=r"--face-parsing-model; facexlib's parsing_bisenet\.pth"):
        prepare(models.prepare_args(pictures[:1], tmp_path / "none", "--face-mask", "--face-parser", "bisenet"))


def test_parsenet_parser_from_a_safetensors_file(t1, tmp_path):
    import torch
    from facexlib.parsing.parsenet import ParseNet
    from safetensors.torch import save_file

    from encoders.face_align import align_face
    from training.face_parsing import FaceParser

    rgb, boxes, kps = t1
    crop, _ = align_face(rgb, kps[0], 96)
    torch.manual_seed(1)
    network = ParseNet(in_size=512, out_size=512, parsing_ch=19).eval()
    weights = tmp_path / "parsing_parsenet.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    mask = FaceParser.from_file(weights, "parsenet")(crop)
    expected = facexlib_face_mask(network, crop, (0.5,) * 3, (0.5,) * 3)
    assert mask.shape == crop.shape[:2] and 0 < expected.mean() < 1
    np.testing.assert_array_equal(mask, expected)
