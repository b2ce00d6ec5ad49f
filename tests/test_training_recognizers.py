"""Which recogniser measures ID similarity in ``training.evaluate``: each paper's own for its table (EmojiDiff:
antelopev2's glintr100.onnx; Arc2Face and FaceCrafter: arcface.onnx), the other on request. Runs insightface and
onnxruntime for real on stand-in ONNX models (tests/support/onnx_face_models.py) and t1.jpg."""

import json

import cv2
import pytest

from encoders.identity import DETECTOR_FILE, FaceAnalyzer
from support.onnx_face_models import export_detector, export_recognizer
from training.evaluate import main as evaluate


@pytest.fixture(scope="module")
def antelope(t1, tmp_path_factory):
    """An antelopev2-style folder with both recognisers, two different (random) networks."""
    rgb, boxes, kps = t1
    folder = tmp_path_factory.mktemp("antelopev2")
    export_detector(folder / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2])
    export_recognizer(folder / "arcface.onnx", seed=1)
    export_recognizer(folder / "glintr100.onnx", seed=2)
    return folder


def id_similarity(tmp_path, antelope, t1, *options):
    """Evaluate t1.jpg against a target embedding made by glintr100.onnx from the same picture: 1.0 exactly when
    glintr100.onnx measured the generated side too."""
    rgb = t1[0]
    generated = tmp_path / "generated"
    generated.mkdir()
    cv2.imwrite(str(generated / "a.png"), rgb[:, :, ::-1])
    glintr = FaceAnalyzer.from_folder(antelope, recognizer="glintr100.onnx", provider="cpu").analyze(rgb)[0].embedding
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"generated": "a.png", "id_embedding": glintr.tolist()}]))
    summary = evaluate(["--generated", str(generated), "--targets", str(targets), "--out", str(tmp_path / "out"),
                        "--insightface", str(antelope), "--provider", "cpu", *options])
    return summary["metrics"]["id_similarity"]["mean"], summary["notes"]


def test_emojidiff_table_measures_id_with_antelopev2_glintr100(tmp_path, antelope, t1):
    similarity, notes = id_similarity(tmp_path, antelope, t1, "--paper-table", "emojidiff")
    assert similarity == pytest.approx(1.0, abs=1e-5)
    assert "ID similarity measured with glintr100.onnx" in notes


@pytest.mark.parametrize("options", [("--paper-table", "facecrafter"), ("--paper-table", "emojidiff",
                                                                          "--recognizer", "arcface.onnx"), ()])
def test_arc2face_recogniser_for_facecrafter_on_request_and_without_a_table(tmp_path, antelope, t1, options):
    similarity, notes = id_similarity(tmp_path, antelope, t1, *options)
    assert similarity < 0.9  # arcface.onnx's embedding against glintr100.onnx's: another network
    assert "ID similarity measured with arcface.onnx" in notes


def test_a_missing_paper_recogniser_is_named_not_replaced(tmp_path, antelope, t1):
    only_arcface = tmp_path / "arcface_only"
    only_arcface.mkdir()
    for name in (DETECTOR_FILE, "arcface.onnx"):
        (only_arcface / name).write_bytes((antelope / name).read_bytes())
    (tmp_path / "generated").mkdir()
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"generated": "a.png", "id_embedding": [1.0] * 512}]))
    with pytest.raises(SystemExit, match=r"(?s)missing glintr100\.onnx.*--recognizer"):
        evaluate(["--generated", str(tmp_path / "generated"), "--targets", str(targets), "--out", str(tmp_path / "out"),
                  "--insightface", str(only_arcface), "--provider", "cpu", "--paper-table", "emojidiff"])
