"""IDI's inswapper path (training/face_swap.py) through insightface's own INSwapper code, on t1.jpg.

The model file is a stand-in with the official ``inswapper_128.onnx`` interface (tests/support/onnx_face_models.py:
inputs ``target`` and ``source``, ``emap`` as the last initializer) that paints its whole output crop one
colour computed from the embedding it is fed; the buffalo_l folder holds the stand-in SCRFD-shaped detector
(it finds three of t1.jpg's faces) and a stand-in ``w600k_r50.onnx`` recogniser. The swapper is built as
``python -m training.idi`` builds it.
"""

from __future__ import annotations

import numpy as np
import pytest

from support.onnx_face_models import export_detector, export_inswapper, export_recognizer, insightface_images

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def swap_models(t1, tmp_path_factory):
    from encoders.identity import DETECTOR_FILE

    rgb, boxes, kps = t1
    folder = tmp_path_factory.mktemp("buffalo_l")
    export_recognizer(folder / "w600k_r50.onnx")
    export_detector(folder / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2])
    weights = export_inswapper(folder / "inswapper_128.onnx")
    return folder, weights


def painted_colour(embedding: np.ndarray, weights, emap: bool = True) -> np.ndarray:
    """The stand-in's colour (RGB uint8) for a source embedding, by hand: normalise, times emap, renormalise
    (insightface's INSwapper.get), then sigmoid(latent @ colour_map) x 255."""
    latent = embedding.astype(np.float64) / np.linalg.norm(embedding)
    if emap:
        latent = latent @ weights["emap"]
        latent /= np.linalg.norm(latent)
    return np.clip(255 / (1 + np.exp(-(latent @ weights["colour_map"]))), 0, 255).astype(np.uint8)


def test_inswapper_replaces_the_largest_face_only_with_the_emap_mapped_source_identity(t1, swap_models):
    import cv2

    from training.idi import build_swapper

    folder, weights = swap_models
    target, boxes, _ = t1
    swapper = build_swapper({"swapper": "inswapper", "swapper_model": str(folder / "inswapper_128.onnx"),
                             "insightface": str(folder)})
    hanks = cv2.imread(str(insightface_images() / "Tom_Hanks_54745.png"))
    source = np.ascontiguousarray(cv2.resize(hanks, target.shape[1::-1])[:, :, ::-1])
    swapped = swapper.swap(source, target)
    assert swapped.shape == target.shape and swapped.dtype == np.uint8

    # the swapped face: the largest the detector finds in the target (box 870, 67, 999, 196 of the test data)
    largest = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    x0, y0, x1, y1 = boxes[largest].astype(int)
    side = x1 - x0
    inner = swapped[y0 + side // 4:y1 - side // 4, x0 + side // 4:x1 - side // 4].reshape(-1, 3).astype(int)
    # its middle is the colour the model paints for the source's embedding mapped by emap (the analyzer's
    # recogniser gives the embedding; the mapping and the colour are computed by hand here)
    embedding = swapper.analyzer.analyze(source)[0].embedding
    expected = painted_colour(np.asarray(embedding), weights).astype(int)
    assert np.abs(inner - expected).max() <= 1, (inner.min(0), inner.max(0), expected)
    assert np.abs(painted_colour(np.asarray(embedding), weights, emap=False).astype(int) - expected).max() > 5

    changed = np.abs(swapped.astype(int) - target.astype(int)).max(2) > 0
    assert changed[y0:y1, x0:x1].mean() > 0.9
    # nothing changes beyond the face box grown by half its side, and the other faces stay as they were
    grown = np.zeros_like(changed)
    grown[max(0, y0 - side // 2):y1 + side // 2, max(0, x0 - side // 2):x1 + side // 2] = True
    assert not (changed & ~grown).any()
    for index, box in enumerate(boxes.astype(int)):
        if index != largest:
            assert not changed[box[1]:box[3], box[0]:box[2]].any(), index
