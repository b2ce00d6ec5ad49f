"""Arc2Face-Exp's Em. Acc., AU-MSE and VA-MSE (training/facetorch_metrics.py) through facetorch's own predictors.

The maths is checked on hand-made arrays. The predictors run with stand-in TorchScript models saved where
facetorch's loader looks (its layout: predictor/fer/2/model.pt, ...), each reading a plain colour back out of
facetorch's preprocessing, so every expected number is worked out by hand from the pictures' colours. Nothing is
downloaded: facetorch's downloader is made to fail if it is ever called, and its download path is checked with
a stand-in for the hub.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import in_ci

from training import facetorch_metrics as ftm
from training.evaluate import main as evaluate
from training.paper_tables import paper_table


@pytest.fixture(autouse=True)
def facetorch_installed():
    try:
        import facetorch  # noqa: F401
    except ImportError:
        message = f"facetorch is not installed: {ftm.INSTALL}"
        if in_ci():
            pytest.fail(f"CI=true: {message} (.ci/run installs it)")
        pytest.skip(message)


# Each stand-in undoes facetorch's ImageNet normalisation (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225) to
# read a channel's mean back in [0, 1].
class FerStandIn(torch.nn.Module):
    """8 logits whose largest is class round(7 x red)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0].mean((1, 2)) * 0.229 + 0.485
        return -(red[:, None] * 7.0 - torch.arange(8, dtype=x.dtype)[None]).abs()


class AuStandIn(torch.nn.Module):
    """41 AU scores: blue x k / 40 for AU k (a parameter, so facetorch's native loading has a state dict to move)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.arange(41, dtype=torch.float32) / 40.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blue = x[:, 2].mean((1, 2)) * 0.225 + 0.406
        return blue[:, None] * self.scale[None]


class VaStandIn(torch.nn.Module):
    """Valence 2 red - 1, arousal 2 green - 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0].mean((1, 2)) * 0.229 + 0.485
        green = x[:, 1].mean((1, 2)) * 0.224 + 0.456
        return torch.stack([2.0 * red - 1.0, 2.0 * green - 1.0], 1)


STAND_INS = {"fer": FerStandIn, "au": AuStandIn, "va": VaStandIn}


def save_stand_in(task: str, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(STAND_INS[task]()).save(str(path))


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models" / "facetorch"
    for task, spec in ftm.PREDICTORS.items():
        save_stand_in(task, folder / spec.path)
    return folder


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    import facetorch.downloader

    def refuse(*args, **kwargs):
        raise AssertionError("a test reached facetorch's downloader")

    monkeypatch.setattr(facetorch.downloader, "hf_hub_download", refuse)
    monkeypatch.setattr(facetorch.downloader.gdown, "download", refuse)


def picture(rgb, size=(48, 40)) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (*size, 3)).copy()


# --- the maths, on hand-made arrays --------------------------------------------------------------------------

def test_emotion_accuracy_is_the_percentage_of_matching_classes():
    assert ftm.emotion_accuracy([0, 4, 7, 5], [0, 4, 1, 6]) == 50.0  # 2 of 4 match
    assert ftm.emotion_accuracy([3], [3]) == 100.0


def test_va_mse_is_the_mean_over_valence_arousal_and_pairs():
    # squared differences 0.16, 0.09 | 0, 0.16 -> 0.41 / 4
    assert ftm.va_mse([[0.5, -0.5], [0.0, 0.0]], [[0.1, -0.2], [0.0, 0.4]]) == pytest.approx(0.1025)
    # one pair: (0.09 + 0.16) / 2, not the sum 0.25
    assert ftm.va_mse([0.0, 0.0], [0.3, 0.4]) == pytest.approx(0.125)


def test_au_mse_is_the_mean_over_the_41_scores_and_pairs():
    target = np.zeros((2, 41))
    generated = np.zeros((2, 41))
    generated[0] = 0.2  # 41 x 0.04 = 1.64 over 82 values
    assert ftm.au_mse(target, generated) == pytest.approx(0.02)
    generated[1, 9] = 0.82  # lip_corner_puller only: + 0.6724
    assert ftm.au_mse(target, generated) == pytest.approx((1.64 + 0.6724) / 82)


@pytest.mark.parametrize("call", [
    lambda: ftm.va_mse([[0, 0, 0]], [[0, 0, 0]]),  # not valence-arousal
    lambda: ftm.au_mse(np.zeros((1, 27)), np.zeros((1, 27))),  # only the 27 main AUs
    lambda: ftm.au_mse(np.zeros((2, 41)), np.zeros((1, 41))),  # unpaired
    lambda: ftm.va_mse([[np.nan, 0]], [[0, 0]]),
    lambda: ftm.emotion_accuracy([8], [0]),  # no ninth class
    lambda: ftm.emotion_accuracy([], []),
])
def test_malformed_values_are_refused(call):
    with pytest.raises(ValueError):
        call()


def test_the_eight_classes_are_the_papers_in_its_order():
    # "anger, contempt, disgust, fear, happiness, neutral, sadness, surprise" (Arc2Face-Exp 4.1)
    assert [e.lower() for e in ftm.EMOTIONS] == ["anger", "contempt", "disgust", "fear", "happiness", "neutral",
                                                 "sadness", "surprise"]
    assert len(ftm.AU_LABELS) == 41 and len(set(ftm.AU_LABELS)) == 41


def test_face_tensor_cuts_the_rounded_box_and_resizes_to_380():
    columns = np.arange(6, dtype=np.uint8) * 40  # pixel value 40 x column
    rgb = np.broadcast_to(columns[None, :, None], (4, 6, 3)).copy()
    face = ftm.face_tensor(rgb, (2.4, 1.0, 4.6, 3.0))  # columns 2, 3, 4 (80, 120, 160), rows 1, 2
    assert face.shape == (1, 3, 380, 380)
    torch.testing.assert_close(face[0, :, :, 0], torch.full((3, 380), 80 / 255))
    torch.testing.assert_close(face[0, :, :, -1], torch.full((3, 380), 160 / 255))
    whole = ftm.face_tensor(rgb, (-10, -10, 100, 100))  # kept inside the picture
    torch.testing.assert_close(whole[0, :, :, -1], torch.full((3, 380), 200 / 255))
    with pytest.raises(ValueError, match="no pixel"):
        ftm.face_tensor(rgb, (7, 0, 9, 4))


# --- facetorch's predictors with stand-in models -------------------------------------------------------------

def test_facetorch_predictors_read_stand_in_models(models):
    annotator = ftm.FacetorchAnnotator(models)
    assert isinstance(annotator.predictors["au"].model, torch.jit.ScriptModule)  # TorchScript on the CPU
    out = annotator(picture((255, 204, 51)))  # red 1.0, green 0.8, blue 0.2
    assert out["facetorch_emotion"] == 7  # round(7 x 1.0): Surprise
    np.testing.assert_allclose(out["facetorch_va"], [1.0, 0.6], atol=1e-5)
    np.testing.assert_allclose(out["facetorch_au"], 0.2 * np.arange(41) / 40, atol=1e-5)
    # facetorch's own postprocessing: its argmax label, its AU scores and its valence/arousal pairs
    faces = ftm.face_tensor(picture((0, 0, 0)))
    assert annotator.predictors["fer"].run(faces)[0].label == "Anger"
    assert annotator.predictors["va"].run(faces)[0].other == pytest.approx({"valence": -1.0, "arousal": -1.0}, abs=1e-5)


def test_evaluate_scores_the_three_columns_by_hand(models, tmp_path, capsys):
    # pair a: target (255, 204, 51) -> Surprise, VA (1.0, 0.6), blue 0.2;
    #         generated (255, 102, 153) -> Surprise, VA (1.0, -0.2), blue 0.6
    # pair b: target (0, 153, 255) -> Anger, VA (-1.0, 0.2), blue 1.0;
    #         generated (204, 153, 204) -> round(5.6) = 6 Sadness, VA (0.6, 0.2), blue 0.8
    # Em. Acc. 1 of 2 = 50 %; VA-MSE (0 + 0.64 + 2.56 + 0) / 4 = 0.8;
    # AU-MSE: mean_k (d k/40)^2 = d^2 x 0.3375 (sum of k^2 for k = 0..40 is 22140; / 41 / 1600), d = 0.4 and 0.2:
    #         (0.16 + 0.04) x 0.3375 / 2 = 0.03375
    generated, expressions = tmp_path / "generated", tmp_path / "expressions"
    generated.mkdir()
    expressions.mkdir()
    for name, target, output in (("a", (255, 204, 51), (255, 102, 153)), ("b", (0, 153, 255), (204, 153, 204))):
        cv2.imwrite(str(expressions / f"{name}.png"), picture(target)[:, :, ::-1])
        cv2.imwrite(str(generated / f"{name}.png"), picture(output)[:, :, ::-1])
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"generated": n, "expression_image": f"expressions/{n}.png"} for n in "ab"]))
    summary = evaluate(["--generated", str(generated), "--targets", str(targets), "--out", str(tmp_path / "out"),
                        "--facetorch", "--facetorch-models", str(models), "--paper-table", "arc2face"])
    values = {key: summary["metrics"][key] for key in ("emotion_acc", "va_mse", "au_mse")}
    assert values["emotion_acc"] == {"value": pytest.approx(50.0), "count": 2}
    assert values["va_mse"] == {"value": pytest.approx(0.8, abs=1e-5), "count": 2}
    assert values["au_mse"] == {"value": pytest.approx(0.03375, abs=1e-6), "count": 2}
    assert any("the whole picture" in note for note in summary["notes"])
    ours = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ours |"))
    assert ours.split(" | ")[2:5] == ["50", "0.03375", "0.8"]  # Em. Acc. (%), AU-MSE, VA-MSE
    table = paper_table("arc2face", summary)
    assert "not computed here: FID, 3D Exp-MSE" in table


def test_target_numbers_are_read_beside_annotated_pictures(models, tmp_path):
    """Entries may carry facetorch values for their target instead of an expression picture."""
    generated = tmp_path / "generated"
    generated.mkdir()
    cv2.imwrite(str(generated / "a.png"), picture((255, 102, 153))[:, :, ::-1])  # Surprise, VA (1.0, -0.2)
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"generated": "a", "facetorch_emotion": 7, "facetorch_va": [0.5, -0.2],
                                    "facetorch_au": [0.6 * k / 40 for k in range(41)]}]))
    summary = evaluate(["--generated", str(generated), "--targets", str(targets), "--out", str(tmp_path / "out"),
                        "--facetorch", "--facetorch-models", str(models)])
    assert summary["metrics"]["emotion_acc"]["value"] == 100.0
    assert summary["metrics"]["va_mse"]["value"] == pytest.approx(0.125, abs=1e-5)  # (0.25 + 0) / 2
    assert summary["metrics"]["au_mse"]["value"] == pytest.approx(0.0, abs=1e-10)


def test_without_facetorch_option_the_columns_are_left_out_with_a_note(tmp_path):
    generated = tmp_path / "generated"
    generated.mkdir()
    cv2.imwrite(str(generated / "a.png"), picture((0, 0, 0)))
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"generated": "a", "facetorch_va": [0, 0]}]))
    summary = evaluate(["--generated", str(generated), "--targets", str(targets), "--out", str(tmp_path / "out")])
    assert "va_mse" not in summary["metrics"]
    assert any("no --facetorch" in note for note in summary["notes"])


# --- loading: missing files, facetorch's downloader, the native AU module, facetorch missing -------------------

def test_missing_model_files_stop_the_run_naming_them(models, tmp_path):
    (models / ftm.PREDICTORS["au"].path).unlink()
    with pytest.raises(ftm.FacetorchMissing) as error:
        ftm.FacetorchAnnotator(models)
    message = str(error.value)
    assert str(models.resolve() / "predictor" / "au" / "1" / "model.pt") in message
    assert "tomas-gajarsky/facetorch-au-opengraph" in message and "--facetorch-download" in message
    assert "predictor/fer" not in message  # only what is missing
    with pytest.raises(SystemExit, match="--facetorch: facetorch's model files are missing"):
        evaluate(["--generated", str(tmp_path), "--targets", str(tmp_path / "t.json"), "--out", str(tmp_path / "o"),
                  "--facetorch", "--facetorch-models", str(models)])


def test_an_unreadable_model_file_is_named(models):
    (models / ftm.PREDICTORS["va"].path).write_text("<html>not a model</html>")
    with pytest.raises(ftm.FacetorchMissing, match=r"(?s)va/1/model\.pt could not be loaded by facetorch.*Delete it"):
        ftm.FacetorchAnnotator(models)


def test_facetorchs_downloader_fetches_missing_files_on_request(tmp_path, monkeypatch):
    """The download goes through facetorch's DownloaderHuggingFace (here with a stand-in for the hub), into the
    models folder, given as a relative path; a file already there is not fetched again."""
    import facetorch.downloader

    fetched = []

    def hub(repo_id, filename, local_dir):
        task = next(task for task, spec in ftm.PREDICTORS.items() if spec.repo_id == repo_id)
        fetched.append((repo_id, filename))
        save_stand_in(task, Path(local_dir) / filename)  # where facetorch asks the hub to put it
        return str((Path(local_dir) / filename).resolve())  # the hub resolves local_dir

    monkeypatch.setattr(facetorch.downloader, "hf_hub_download", hub)
    monkeypatch.chdir(tmp_path)
    save_stand_in("fer", tmp_path / "models" / "facetorch" / ftm.PREDICTORS["fer"].path)
    annotator = ftm.FacetorchAnnotator(ftm.DEFAULT_MODELS, download=True)
    assert sorted(fetched) == [("tomas-gajarsky/facetorch-au-opengraph", "model.pt"),
                               ("tomas-gajarsky/facetorch-va-elim", "model.pt")]
    assert ftm.missing_files(ftm.DEFAULT_MODELS) == []
    np.testing.assert_allclose(annotator(picture((255, 51, 0)))["facetorch_va"], [1.0, -0.6], atol=1e-5)


def test_au_weights_load_into_a_native_module_as_facetorch_does_on_cuda(models):
    assert ftm.au_native_class("cuda") == ftm.AU_NATIVE_CLASS and ftm.au_native_class("cpu") is None
    module, name = ftm.AU_NATIVE_CLASS.rsplit(".", 1)
    assert issubclass(getattr(importlib.import_module(module), name), torch.nn.Module)  # facetorch's OpenGraphAU
    annotator = ftm.FacetorchAnnotator(models, au_native=f"{AuStandIn.__module__}.AuStandIn")
    model = annotator.predictors["au"].model
    assert type(model).__name__ == "AuStandIn" and not isinstance(model, torch.jit.ScriptModule)
    np.testing.assert_allclose(annotator(picture((0, 0, 102)))["facetorch_au"], 0.4 * np.arange(41) / 40, atol=1e-5)


def test_without_facetorch_the_message_says_how_to_install_it(models, monkeypatch):
    for name in [n for n in sys.modules if n == "facetorch" or n.startswith("facetorch.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ftm.FacetorchMissing, match=r"pip install --no-deps -r requirements-facetorch\.txt"):
        ftm.FacetorchAnnotator(models)
