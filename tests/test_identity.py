"""ArcFace face analysis on real pictures with tiny ONNX models exported from torch in the test.

The recogniser is a tiny conv net (112x112x3 -> 512). The detector is a stand-in with SCRFD's
nine outputs whose values place the real t1.jpg faces (from shared/testdata) on anchors, so
insightface's own SCRFD decoding, letterbox scaling and NMS run on it. Both are built by
``onnx_face_models`` (shared with the ComfyUI node tests).
"""

from __future__ import annotations

import os

import cv2
import insightface
import numpy as np
import pytest
import torch

from encoders.identity import (
    DETECTOR_FILE,
    Detection,
    FaceAnalyzer,
    FaceNotFoundError,
    average_identity,
    embed_identity,
    find_model_files,
    onnx_providers,
    sort_by_area,
)
from encoders.images import bgr_to_image_tensor, to_bgr_uint8_list, to_uint8_rgb
from support.onnx_face_models import (
    DET_SIZE,
    export_detector,
    export_recognizer,
    insightface_images,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

IMAGES = insightface_images()


@pytest.fixture(scope="module")
def models(tmp_path_factory, t1):
    folder = tmp_path_factory.mktemp("antelopev2")
    rgb, boxes, kps = t1
    module = export_recognizer(folder / "arcface.onnx")
    # scores deliberately not in area order: the smallest box scores highest
    export_detector(folder / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2])
    return folder, module


@pytest.fixture(scope="module")
def recognizer_only(models):
    folder, module = models
    return FaceAnalyzer(folder / "arcface.onnx", provider="cpu"), module


def given(boxes, kps):
    return [[Detection(box, points, 1.0) for box, points in zip(boxes, kps)]]


def reference_embedding(module, crop_bgr):
    """What the recogniser computes, written out: RGB, (x - 127.5) / 127.5, NCHW, L2-normalised."""
    x = (crop_bgr[:, :, ::-1].astype(np.float32) - 127.5) / 127.5
    with torch.no_grad():
        out = module(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None])[0].numpy()
    return out / np.linalg.norm(out)


def test_embedding_matches_alignment_and_recogniser_written_out(recognizer_only, t1):
    analyzer, module = recognizer_only
    rgb, boxes, kps = t1
    result = analyzer.analyze(rgb, detections=given(boxes, kps))[0]
    face_align = insightface.utils.face_align
    largest = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    expected_crop = face_align.norm_crop(rgb[:, :, ::-1].copy(), kps[largest], image_size=112)
    np.testing.assert_array_equal(result.crop, expected_crop)
    assert result.embedding.shape == (512,) and result.embedding.dtype == np.float32
    assert abs(np.linalg.norm(result.embedding) - 1.0) < 1e-5
    np.testing.assert_allclose(result.embedding, reference_embedding(module, expected_crop), atol=2e-5)
    np.testing.assert_array_equal(result.box, boxes[largest])
    assert result.faces_found == 3 and result.image_index == 0 and result.face_index == 0


def test_embedding_is_deterministic_across_sessions(models, recognizer_only, t1):
    folder, _ = models
    analyzer, _ = recognizer_only
    rgb, boxes, kps = t1
    first = analyzer.analyze(rgb, detections=given(boxes, kps))[0].embedding
    again = analyzer.analyze(rgb, detections=given(boxes, kps))[0].embedding
    fresh = FaceAnalyzer(folder / "arcface.onnx", provider="cpu").analyze(rgb, detections=given(boxes, kps))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, fresh[0].embedding)


def test_faces_are_ordered_by_box_area(recognizer_only, t1):
    analyzer, _ = recognizer_only
    rgb, boxes, kps = t1
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # stable order: equal areas keep the given order
    expected = sorted(range(len(boxes)), key=lambda i: -areas[i])
    embeddings = []
    for face_index, original in enumerate(expected):
        result = analyzer.analyze(rgb, face_index=face_index, detections=given(boxes, kps))[0]
        np.testing.assert_array_equal(result.box, boxes[original])
        np.testing.assert_array_equal(result.kps, kps[original])
        embeddings.append(result.embedding)
    assert len({e.tobytes() for e in embeddings}) == 3
    assert [d.area for d in sort_by_area(given(boxes, kps)[0])] == sorted(areas.tolist(), reverse=True)
    with pytest.raises(FaceNotFoundError, match=r"Image 1: face_index 3 .* 3 face\(s\).*largest first"):
        analyzer.analyze(rgb, face_index=3, detections=given(boxes, kps))


def test_insightface_detection_path_on_the_stand_in_detector_orders_faces_largest_first(models, recognizer_only, t1):
    """insightface's own SCRFD decoding on the stand-in detector's outputs (no SCRFD weights offline)."""
    folder, _ = models
    rgb, boxes, kps = t1
    analyzer = FaceAnalyzer.from_folder(folder, det_size=DET_SIZE, provider="cpu")
    detections = analyzer.detect(to_bgr_uint8_list(rgb)[0])
    assert len(detections) == 3
    assert [d.area for d in detections] == sorted((d.area for d in detections), reverse=True)
    for detection in detections:
        original = int(np.argmin(np.abs(boxes - detection.box).sum(1)))
        np.testing.assert_allclose(detection.box, boxes[original], atol=0.05)
        np.testing.assert_allclose(detection.kps, kps[original], atol=0.05)
    np.testing.assert_allclose([detections[0].score], [0.8], atol=1e-6)
    detected = analyzer.analyze(rgb)[0]
    with_given = recognizer_only[0].analyze(rgb, detections=given(boxes, kps))[0]
    np.testing.assert_allclose(detected.embedding, with_given.embedding, atol=1e-3)


def test_no_face_error_names_image_and_detection_size(models, t1):
    folder, _ = models
    rgb, _, _ = t1
    analyzer = FaceAnalyzer.from_folder(folder, det_size=DET_SIZE, provider="cpu")
    blank = np.zeros_like(rgb)
    # the stand-in detector "finds" the t1 faces on any picture, so image 2 is given no detections
    with pytest.raises(FaceNotFoundError, match=r"No face found in image 2 of 2 \(no detections"):
        analyzer.analyze([rgb, blank], detections=[[Detection([0, 0, 10, 10], np.zeros((5, 2)))], []])
    # a stand-in detector that finds nothing: the detection path reports the size it ran at
    empty = folder.parent / "empty_detector"
    empty.mkdir(exist_ok=True)
    export_detector(empty / DETECTOR_FILE, [], [], [], rgb.shape[:2])
    if not (empty / "arcface.onnx").exists():
        os.link(folder / "arcface.onnx", empty / "arcface.onnx")
    nothing = FaceAnalyzer.from_folder(empty, provider="cpu")
    with pytest.raises(FaceNotFoundError, match=r"No face found in image 1 of 1 \(detection size 640x640"):
        nothing.analyze(rgb)


def test_image_formats_give_the_same_embedding(recognizer_only, t1):
    analyzer, _ = recognizer_only
    rgb, boxes, kps = t1
    dets = given(boxes, kps)
    reference = analyzer.analyze(rgb, detections=dets)[0].embedding
    variants = {
        "float 0..1": rgb.astype(np.float32) / 255.0,
        "16-bit": rgb.astype(np.uint16) * 257,
        "RGBA": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
        "IMAGE tensor": torch.from_numpy(rgb.astype(np.float32) / 255.0)[None],
        "float16 tensor": torch.from_numpy(rgb.astype(np.float32) / 255.0).half()[None],
    }
    for name, image in variants.items():
        embedding = analyzer.analyze(image, detections=dets)[0].embedding
        # float16 cannot hold every 8-bit level exactly
        tolerance = 1e-2 if name == "float16 tensor" else 0.0
        np.testing.assert_allclose(embedding, reference, atol=tolerance, err_msg=name)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    grey_reference = analyzer.analyze(np.dstack([grey] * 3), detections=dets)[0].embedding
    for image in (grey, grey[:, :, None], torch.from_numpy(grey[None, :, :, None] / 255.0)):
        np.testing.assert_array_equal(analyzer.analyze(image, detections=dets)[0].embedding, grey_reference)
    assert float(grey_reference @ reference) < 1.0 - 1e-6  # colour does reach the recogniser


def test_image_conversion_rules():
    np.testing.assert_array_equal(to_uint8_rgb(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]])), [[[0] * 3, [128] * 3, [255] * 3, [255] * 3, [0] * 3]])
    np.testing.assert_array_equal(to_uint8_rgb(np.array([[0, 257, 65535]], np.uint16))[0, :, 0], [0, 1, 255])
    np.testing.assert_array_equal(to_uint8_rgb(np.array([[[10, 200]]], np.uint8)), [[[10, 10, 10]]])
    assert to_uint8_rgb(np.zeros((4, 5), bool)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="image 2 has NaN"):
        to_bgr_uint8_list([np.zeros((2, 2, 3)), np.full((2, 2, 3), np.nan)])
    with pytest.raises(ValueError, match="5 channels"):
        to_uint8_rgb(np.zeros((2, 2, 5)))
    with pytest.raises(ValueError, match="empty"):
        to_bgr_uint8_list(torch.zeros(0, 8, 8, 3))
    batch = to_bgr_uint8_list(torch.rand(2, 6, 7, 3))
    assert len(batch) == 2 and batch[0].shape == (6, 7, 3) and batch[0].dtype == np.uint8
    back = bgr_to_image_tensor(batch)
    assert back.shape == (2, 6, 7, 3) and back.dtype == torch.float32
    np.testing.assert_array_equal((back.numpy() * 255).round().astype(np.uint8)[..., ::-1], np.stack(batch))


def test_batch_and_aligned_picture(recognizer_only, t1):
    analyzer, module = recognizer_only
    rgb, boxes, kps = t1
    tom = cv2.imread(str(IMAGES / "Tom_Hanks_54745.png"))[:, :, ::-1].copy()
    # the picture is already an ArcFace-aligned 112x112 crop: its keypoints are the template
    template = insightface.utils.face_align.arcface_dst
    results = analyzer.analyze([rgb, tom], detections=given(boxes, kps) + given([[0, 0, 112, 112]], [template]))
    assert [r.image_index for r in results] == [0, 1]
    assert np.abs(results[1].crop.astype(int) - tom[:, :, ::-1]).max() <= 1
    np.testing.assert_allclose(results[1].embedding, reference_embedding(module, results[1].crop), atol=2e-5)


def test_embed_identity_and_averaging(recognizer_only, t1):
    analyzer, _ = recognizer_only
    rgb, boxes, kps = t1
    flipped = rgb[:, ::-1].copy()
    width = rgb.shape[1]
    flipped_boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    flipped_kps = kps[:, [1, 0, 2, 4, 3]] * [-1, 1] + [width, 0]
    detections = given(boxes, kps) + given(flipped_boxes, flipped_kps) + given(boxes, kps)
    images = [rgb, flipped, (rgb * 0.8).astype(np.uint8)]
    batch = embed_identity(analyzer, images, detections=detections)
    assert batch.embeddings.shape == (3, 512) and batch.crops.shape == (3, 112, 112, 3)
    np.testing.assert_array_equal(batch.crops[0].numpy(), batch.faces[0].crop[:, :, ::-1] / np.float32(255))
    averaged = embed_identity(analyzer, images, detections=detections, average=True)
    mean = batch.embeddings.numpy().mean(0)
    assert averaged.embeddings.shape == (1, 512)
    np.testing.assert_allclose(averaged.embeddings[0].numpy(), mean / np.linalg.norm(mean), atol=1e-6)
    assert averaged.average.kept == [0, 1, 2] and averaged.crops.shape[0] == 3


def test_outlier_rejection_by_cosine_distance():
    rng = np.random.default_rng(0)
    person = rng.normal(size=512)
    photos = [person + rng.normal(size=512) * 0.8 for _ in range(4)]
    stranger = rng.normal(size=512)
    embeddings = np.stack(photos + [stranger])
    plain = average_identity(embeddings)
    assert plain.kept == [0, 1, 2, 3, 4] and plain.rejected == []
    assert plain.distances[4] > 0.5 > plain.distances[:4].max()
    filtered = average_identity(embeddings, outlier_distance=0.5)
    assert filtered.rejected == [4]
    unit = embeddings[:4] / np.linalg.norm(embeddings[:4], axis=1, keepdims=True)
    expected = unit.mean(0) / np.linalg.norm(unit.mean(0))
    np.testing.assert_allclose(filtered.embedding, expected, atol=1e-6)
    assert abs(np.linalg.norm(filtered.embedding) - 1) < 1e-6
    # two photos are equally far from their mean: nothing to reject
    assert average_identity(embeddings[[0, 4]], outlier_distance=0.1).rejected == []
    with pytest.raises(ValueError, match="different people"):
        average_identity(np.eye(3, 8), outlier_distance=0.1)
    with pytest.raises(ValueError, match=r"embeddings \[1\] are zero or not finite"):
        average_identity(np.stack([person, np.full(512, np.nan)]))


def test_non_finite_embedding_is_an_error(tmp_path, t1):
    rgb, boxes, kps = t1
    export_recognizer(tmp_path / "arcface.onnx", nan=True)
    analyzer = FaceAnalyzer(tmp_path / "arcface.onnx", provider="cpu")
    with pytest.raises(ValueError, match=r"non-finite embedding for image 1"):
        analyzer.analyze(rgb, detections=given(boxes, kps))


def test_missing_model_files_name_folder_files_and_sources(tmp_path, models):
    folder, _ = models
    with pytest.raises(FileNotFoundError) as error:
        find_model_files(tmp_path)
    message = str(error.value)
    for text in (str(tmp_path), DETECTOR_FILE, "arcface.onnx or glintr100.onnx", "antelopev2", "FoivosPar/Arc2Face"):
        assert text in message
    os.link(folder / "arcface.onnx", tmp_path / "arcface.onnx")
    with pytest.raises(FileNotFoundError, match=rf"missing {DETECTOR_FILE} \(it has: arcface.onnx\)"):
        find_model_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_model_files(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is missing my_arcface.onnx"):
        find_model_files(folder, recognizer="my_arcface.onnx")
    # antelopev2.zip unzipped into antelopev2/ nests a second folder
    nested = tmp_path / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    for name in (DETECTOR_FILE, "arcface.onnx"):
        os.link(folder / name, nested / name)
    os.link(folder / "arcface.onnx", nested / "glintr100.onnx")
    assert find_model_files(tmp_path / "antelopev2") == (nested / DETECTOR_FILE, nested / "arcface.onnx")
    assert find_model_files(nested, recognizer="glintr100.onnx")[1] == nested / "glintr100.onnx"


def test_wrong_model_kind_and_settings(models):
    folder, _ = models
    with pytest.raises(ValueError, match="is not a face recognition model"):
        FaceAnalyzer(folder / DETECTOR_FILE, provider="cpu")
    with pytest.raises(ValueError, match="multiple of 32"):
        FaceAnalyzer(folder / "arcface.onnx", det_size=500, provider="cpu")
    with pytest.raises(RuntimeError, match="without a detector"):
        FaceAnalyzer(folder / "arcface.onnx", provider="cpu").detect(np.zeros((64, 64, 3), np.uint8))


def test_providers():
    import onnxruntime

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert onnx_providers("auto")[0] == ("CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider")
    if not has_cuda:
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            onnx_providers("cuda")
    with pytest.raises(ValueError, match="unknown provider"):
        onnx_providers("tpu")
