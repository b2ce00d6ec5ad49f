"""MediaPipe FaceLandmarker wrapper: model-file errors and result conversion (no model needed)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from encoders.expressions import ARKIT_BLENDSHAPE_NAMES, ArkitBlendshapes, Landmarks
from encoders.face_landmarks import (
    FACE_LANDMARKER_URL,
    FaceLandmarker,
    face_landmarker_path,
    result_rows,
)


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


def test_corrupt_model_file_error(tmp_path):
    pytest.importorskip("mediapipe")
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


def test_result_rows_orders_faces_largest_first():
    small, large = _face(0.1, 0.1, 0.1), _face(0.5, 0.5, 0.4, seed=1)
    scores_small, scores_large = np.full(52, 0.1), np.full(52, 0.9)
    result = _result([small, large], [scores_small, scores_large])
    landmarks, blendshapes, matrix = result_rows(result, 100, 100, face_index=0)
    assert landmarks.shape == (478, 3) and landmarks[:, 0].min() >= 0.5  # the large face
    assert np.allclose(blendshapes, 0.9) and np.allclose(matrix, np.eye(4) * 2)
    landmarks, blendshapes, _ = result_rows(result, 100, 100, face_index=1)
    assert landmarks[:, 0].max() <= 0.2 and np.allclose(blendshapes, 0.1)
    assert result_rows(result, 100, 100, face_index=2) is None
    assert result_rows(_result([], []), 100, 100) is None


class _FakeTask:
    """Stands in for mediapipe's FaceLandmarker: a face in every image except those listed."""

    def __init__(self, empty):
        self.empty, self.calls = set(empty), 0

    def detect(self, image):
        k, self.calls = self.calls, self.calls + 1
        if k in self.empty:
            return _result([], [])
        scores = np.zeros(52)
        scores[ARKIT_BLENDSHAPE_NAMES.index("jawOpen")] = 0.1 * (k + 1)
        return _result([_face(0.2, 0.2, 0.5, seed=k)], [scores])

    def close(self):
        pass


def _landmarker(tmp_path, monkeypatch, empty=()):
    mp = pytest.importorskip("mediapipe")
    (tmp_path / "face_landmarker.task").write_bytes(b"x")
    landmarker = FaceLandmarker(tmp_path)
    task = _FakeTask(empty)
    monkeypatch.setattr(landmarker, "_create", lambda video: (mp, task))
    return landmarker


def test_detect_batch(tmp_path, monkeypatch):
    landmarker = _landmarker(tmp_path, monkeypatch)
    result = landmarker.detect(torch.rand(3, 40, 60, 3))
    assert isinstance(result.landmarks, Landmarks) and result.landmarks.values.shape == (3, 478, 3)
    assert result.landmarks.image_size == (40, 60)
    assert isinstance(result.blendshapes, ArkitBlendshapes)
    assert result.blendshapes.values[:, ARKIT_BLENDSHAPE_NAMES.index("jawOpen")].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert result.matrices.shape == (3, 4, 4) and result.found == [True, True, True]


def test_no_face_error_names_batch_index(tmp_path, monkeypatch):
    landmarker = _landmarker(tmp_path, monkeypatch, empty=[1])
    with pytest.raises(ValueError, match=r"no face found in image 2 of the batch \(counting from 1\)"):
        landmarker.detect(torch.rand(3, 40, 60, 3))
    landmarker = _landmarker(tmp_path, monkeypatch, empty=[0, 2])
    result = landmarker.detect(torch.rand(3, 40, 60, 3), on_missing="previous")
    assert result.found == [False, True, False]
    assert torch.equal(result.landmarks.values[0], result.landmarks.values[1])
    assert torch.equal(result.landmarks.values[2], result.landmarks.values[1])
    with pytest.raises(ValueError, match="face_index"):
        landmarker.detect(torch.rand(1, 8, 8, 3), face_index=9)
