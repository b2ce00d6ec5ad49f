"""MediaPipe FaceLandmarker wrapper: model-file errors, result conversion, and Google's real
``face_landmarker.task`` (fixture ``mediapipe_task``) on real faces.

References the numbers are checked against come from outside this code: the MediaPipe FaceMesh points of
three t1.jpg faces in the shared test data, insightface's ArcFace 5-point template (Tom_Hanks_54745.png is a
112x112 crop aligned to it), the blendshape categories MediaPipe itself returns, and plain geometry (frames
made by shifting and scaling one photo move its landmarks by the same affine map).
"""

from types import SimpleNamespace

import mediapipe as mp
import numpy as np
import pytest
import torch

from encoders.expressions import ARKIT_BLENDSHAPE_NAMES, ArkitBlendshapes, Landmarks
from encoders.face_landmarks import (
    FACE_LANDMARKER_URL,
    FaceLandmarker,
    analyzer_face_boxes,
    face_landmarker_path,
    result_rows,
)
from support.real_faces import arcface_template, as_image, crop, read_rgb, square_around, t1_faces


def test_missing_model_error_names_folder_file_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        face_landmarker_path(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "face_landmarker.task" in message and FACE_LANDMARKER_URL in message
    with pytest.raises(FileNotFoundError, match="face_landmarker.task"):
        FaceLandmarker(tmp_path / "nowhere")
    model = tmp_path / "face_landmarker.task"
    model.write_bytes(b"x")
    assert face_landmarker_path(tmp_path) == str(model)
    assert face_landmarker_path(model) == str(model)
    with pytest.raises(FileNotFoundError, match="custom.task"):
        face_landmarker_path(tmp_path / "custom.task")
    with pytest.raises(ValueError, match="crop_scale"):
        FaceLandmarker(model, crop_scale=float("nan"))


def test_corrupt_model_file_error(tmp_path):
    (tmp_path / "face_landmarker.task").write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="could not load the MediaPipe face landmarker model"):
        FaceLandmarker(tmp_path).detect(np.zeros((32, 32, 3), dtype=np.uint8))


def _face(x0, y0, size, seed=0):
    rng = np.random.default_rng(seed)
    points = [SimpleNamespace(x=x0 + size * u, y=y0 + size * v, z=0.01 * w) for u, v, w in rng.random((478, 3))]
    return points


def _categories(scores):
    return [SimpleNamespace(index=i, score=s, category_name=n) for i, (n, s) in enumerate(zip(ARKIT_BLENDSHAPE_NAMES, scores))]


def _result(faces, scores):
    return SimpleNamespace(
        face_landmarks=faces,
        face_blendshapes=[_categories(s) for s in scores],
        facial_transformation_matrixes=[np.eye(4) * (i + 1) for i in range(len(faces))],
    )


def test_result_rows_orders_faces_largest_first_or_nearest_the_centre():
    small, large = _face(0.45, 0.45, 0.1), _face(0.0, 0.0, 0.4, seed=1)
    scores_small, scores_large = np.full(52, 0.1), np.full(52, 0.9)
    result = _result([small, large], [scores_small, scores_large])
    landmarks, blendshapes, matrix = result_rows(result, 100, 100, face_index=0)
    assert landmarks.shape == (478, 3) and landmarks[:, 0].max() <= 0.4  # the large face
    assert np.allclose(blendshapes, 0.9) and np.allclose(matrix, np.eye(4) * 2)
    landmarks, blendshapes, _ = result_rows(result, 100, 100, face_index=1)
    assert landmarks[:, 0].min() >= 0.45 and np.allclose(blendshapes, 0.1)
    assert result_rows(result, 100, 100, face_index=2) is None
    assert result_rows(_result([], []), 100, 100) is None
    # the small face's box centre is about (0.5, 0.5): nearest the centre of the picture
    assert np.allclose(result_rows(result, 100, 100, order="centre")[1], 0.1)


# --- the real model --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def landmarker(mediapipe_task):
    with FaceLandmarker(mediapipe_task) as model:
        yield model


@pytest.fixture(scope="module")
def faces():
    loaded = t1_faces()
    if loaded is None:
        pytest.skip("shared test data t1_faces.npz not found")
    return loaded


def pixel_errors(landmarks: Landmarks, row: int, expected_px: np.ndarray) -> np.ndarray:
    return np.linalg.norm(landmarks.pixels()[row, :, :2].numpy() - expected_px, axis=-1)


def test_real_model_on_t1_face_crops_agrees_with_the_test_data_mesh(landmarker, faces):
    t1 = read_rgb("t1.jpg")
    for index, box in enumerate(faces["boxes"]):
        bounds = square_around(box, t1)
        result = landmarker.detect(as_image(crop(t1, bounds)))
        assert result.found == [True]
        errors = pixel_errors(result.landmarks, 0, faces["mesh_px"][index] - np.array(bounds[:2]))
        # faces about 110-130 px across in the crop: a few pixels, as two MediaPipe runs on different framings give
        assert np.median(errors) < 4.0 and errors.mean() < 4.5 and np.percentile(errors, 95) < 8.0, (index, errors.mean())


def test_real_blendshapes_are_mediapipes_categories_in_order_and_in_range(landmarker, mediapipe_task, faces):
    t1 = read_rgb("t1.jpg")
    picture = crop(t1, square_around(faces["boxes"][0], t1))
    ours = landmarker.detect(as_image(picture)).blendshapes.values[0]
    # MediaPipe's own task, called directly: its category names and scores are the reference
    vision = mp.tasks.vision
    options = vision.FaceLandmarkerOptions(base_options=mp.tasks.BaseOptions(model_asset_path=str(mediapipe_task)),
                                           output_face_blendshapes=True, num_faces=1)
    with vision.FaceLandmarker.create_from_options(options) as task:
        [categories] = task.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=picture)).face_blendshapes
    names = [category.category_name for category in categories]
    assert names[0] == "_neutral" and names == list(ARKIT_BLENDSHAPE_NAMES)
    np.testing.assert_allclose(ours.numpy(), [category.score for category in categories], atol=1e-6)
    assert ours.shape == (52,) and float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    assert float(ours.max()) > 0.3  # a real face moves some blendshapes well away from 0


def test_real_model_on_an_arcface_aligned_photo(landmarker):
    result = landmarker.detect(as_image(read_rgb("Tom_Hanks_54745.png")))
    assert result.found == [True] and result.landmarks.image_size == (112, 112)
    points = result.landmarks.pixels()[0, :, :2].numpy()
    # iris centres (subject's right eye is on the image's left) and mouth corners vs insightface's template
    template = arcface_template()
    found = points[[468, 473, 61, 291]]
    expected = template[[0, 1, 3, 4]]
    assert np.linalg.norm(found - expected, axis=-1).max() < 7.0
    assert isinstance(result.blendshapes, ArkitBlendshapes) and result.matrices.shape == (1, 4, 4)


def test_batches_name_the_image_without_a_face_or_reuse_the_previous_one(landmarker, faces):
    t1 = read_rgb("t1.jpg")
    face = crop(t1, square_around(faces["boxes"][1], t1))
    batch = as_image(face, np.zeros_like(face), face)
    with pytest.raises(ValueError, match=r"no face found in image 2 of the batch \(counting from 1\)"):
        landmarker.detect(batch)
    result = landmarker.detect(batch, on_missing="previous")
    assert result.found == [True, False, True] and result.landmarks.values.shape == (3, 478, 3)
    assert torch.equal(result.landmarks.values[1], result.landmarks.values[0])
    torch.testing.assert_close(result.landmarks.values[2], result.landmarks.values[0])  # same picture, same answer
    with pytest.raises(ValueError, match="face_index"):
        landmarker.detect(batch, face_index=9)


def test_whole_group_photo_finds_no_face_and_says_what_to_do(landmarker):
    with pytest.raises(ValueError) as error:
        landmarker.detect(as_image(read_rgb("t1.jpg")))
    message = str(error.value)
    assert "no face found in image 1 of the batch" in message and "short-range" in message and "Load InsightFace" in message


def test_whole_group_photo_retries_on_crops_around_detected_faces(landmarker, faces):
    """The boxes come from the test data (dlib's detector): the stand-in for a face analyzer's boxes."""
    t1 = read_rgb("t1.jpg")
    boxes = sorted(faces["boxes"], key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    order = [next(i for i, b in enumerate(faces["boxes"]) if np.array_equal(b, box)) for box in boxes]
    for face_index, reference in enumerate(order):
        result = landmarker.detect(as_image(t1), face_index=face_index, face_boxes=lambda frame: boxes)
        assert result.found == [True] and result.landmarks.image_size == t1.shape[:2]
        errors = pixel_errors(result.landmarks, 0, faces["mesh_px"][reference])
        assert np.median(errors) < 4.0 and errors.mean() < 4.5, (face_index, errors.mean())
    with pytest.raises(ValueError, match="also retried on crops"):
        landmarker.detect(as_image(t1), face_boxes=lambda frame: [np.array([0, 0, 40, 40])])  # a corner: no face


def test_retry_through_insightface_with_the_stand_in_detector(landmarker, faces, tmp_path):
    """insightface's SCRFD decoding runs on the stand-in detector of ``onnx_face_models`` (no SCRFD weights
    are available offline); it reports the test data's three boxes, MediaPipe does the rest for real."""
    from encoders.identity import FaceAnalyzer
    from support.onnx_face_models import export_detector, export_recognizer

    t1 = read_rgb("t1.jpg")
    export_detector(tmp_path / "det.onnx", faces["boxes"], faces["kps5"], [0.9, 0.9, 0.9], t1.shape[:2])
    export_recognizer(tmp_path / "rec.onnx")
    analyzer = FaceAnalyzer(tmp_path / "rec.onnx", tmp_path / "det.onnx", provider="cpu")
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in faces["boxes"]]
    largest = int(np.argmax(areas))
    result = landmarker.detect(as_image(t1), face_boxes=analyzer_face_boxes(analyzer))
    errors = pixel_errors(result.landmarks, 0, faces["mesh_px"][largest])
    assert np.median(errors) < 4.0


def test_video_mode_follows_a_face_that_moves_and_grows(landmarker, faces):
    import cv2

    t1 = read_rgb("t1.jpg")
    bounds = square_around(faces["boxes"][0], t1)
    first = crop(t1, bounds)
    side = first.shape[1]
    maps = []
    frames = []
    for k in range(6):  # 3 px right, 2 px up and 4% larger each frame, about the crop's centre
        scale, shift = 1 + 0.04 * k, np.array([3.0 * k, -2.0 * k])
        matrix = np.float32([[scale, 0, (1 - scale) * side / 2 + shift[0]], [0, scale, (1 - scale) * side / 2 + shift[1]]])
        maps.append(matrix)
        frames.append(cv2.warpAffine(first, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    result = landmarker.detect(as_image(*frames), running_mode="video", fps=10.0)
    assert result.found == [True] * 6
    reference = faces["mesh_px"][0] - np.array(bounds[:2])
    for k, matrix in enumerate(maps):
        expected = reference @ matrix[:, :2].T + matrix[:, 2]
        errors = pixel_errors(result.landmarks, k, expected)
        assert np.median(errors) < 4.0 and errors.mean() < 4.5, (k, errors.mean())
