"""Arc2Face-Exp's expression columns through Facetorch (paper section 4.1; Tables 1-3): Em. Acc., AU-MSE, VA-MSE.

The paper: "To extract Valence-Arousal values, AU intensities, and emotion labels for all images, we employ
off-the-shelf models from the Facetorch toolkit". We run the same three models through facetorch's own code:
its ``FacePredictor`` with its pre- and postprocessors, and its model loading (``BaseModel.load_model``:
``torch.jit.load`` of the file, which facetorch's ``DownloaderHuggingFace`` fetches when it is missing and a
download was asked for). The settings are those of facetorch's configs (``conf/analyzer/predictor/``):

- ``fer/efficientnet_b2_8``: EfficientNet-B2, 8 classes in the paper's order (anger, contempt, disgust, fear,
  happiness, neutral, sadness, surprise), 260 x 260, ImageNet normalisation, argmax (``PostArgMax``);
- ``au/open_graph_swin_base``: OpenGraphAU, 41 AU scores (27 AUs, then 14 left/right ones), 224 x 224
  (``PostMultiLabel``; the scores are its ``logits``). On CUDA it is loaded as facetorch's native
  ``OpenGraphAU`` module, as facetorch 0.6.2's config does (its TorchScript Swin hangs on CUDA 12); on the CPU as
  TorchScript, which facetorch reports bitwise identical;
- ``va/elim_al_alexnet``: ELIM, valence and arousal in [-1, 1], 224 x 224 (``PostLabelConfidencePairs``).

Faces reach the predictors as facetorch's analyzer hands them over: the detector's face box cut from the
picture (no expansion, ``expand_box_ratio: 0``), in [0, 1], resized to 380 x 380 (its default unifier,
``img_380``). Our box is insightface's (``training.evaluate --insightface``; facetorch's detector is
RetinaFace); without a box the whole picture is the face.

Our reading of the columns (the paper gives no formula): Em. Acc. is the percentage of pairs whose generated
picture gets the class facetorch gives the target picture; AU-MSE is the mean over the 41 AU scores and the
pairs of the squared difference; VA-MSE the mean over valence, arousal and the pairs (not the sum of the two).

Model files live in one folder (default ``models/facetorch``) in facetorch's own layout, so a folder that
facetorch filled (``/opt/facetorch/models/torchscript``) works as it is. facetorch 0.6.2 declares torch<2.4;
install it without its dependencies: ``python -m pip install --no-deps -r requirements-facetorch.txt``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL = "python -m pip install --no-deps -r requirements-facetorch.txt"
DEFAULT_MODELS = Path("models") / "facetorch"

EMOTIONS = ("Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
AU_LABELS = (
    "inner_brow_raiser", "outer_brow_raiser", "brow_lowerer", "upper_lid_raiser", "cheek_raiser", "lid_tightener",
    "nose_wrinkler", "upper_lip_raiser", "nasolabial_deepener", "lip_corner_puller", "sharp_lip_puller", "dimpler",
    "lip_corner_depressor", "lower_lip_depressor", "chin_raiser", "lip_pucker", "tongue_show", "lip_stretcher",
    "lip_funneler", "lip_tightener", "lip_pressor", "lips_part", "jaw_drop", "mouth_stretch", "lip_bite",
    "nostril_dilator", "nostril_compressor", "left_inner_brow_raiser", "right_inner_brow_raiser",
    "left_outer_brow_raiser", "right_outer_brow_raiser", "left_brow_lowerer", "right_brow_lowerer",
    "left_cheek_raiser", "right_cheek_raiser", "left_upper_lip_raiser", "right_upper_lip_raiser",
    "left_nasolabial_deepener", "right_nasolabial_deepener", "left_dimpler", "right_dimpler")
VA_LABELS = ("valence", "arousal")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNIFIED_SIZE = 380  # facetorch's default unifier (conf/analyzer/unifier/img_380.yaml)
AU_NATIVE_CLASS = "facetorch.analyzer.predictor.au_model.OpenGraphAU"


@dataclass(frozen=True)
class PredictorSpec:
    """One of facetorch's predictors: its file (facetorch's layout, inside the models folder), where facetorch's
    downloader gets it, its input size and labels."""

    task: str
    path: str
    repo_id: str
    size: int
    labels: tuple[str, ...]


PREDICTORS = {
    "fer": PredictorSpec("fer", "predictor/fer/2/model.pt", "tomas-gajarsky/facetorch-fer-efficientnet-b2", 260, EMOTIONS),
    "au": PredictorSpec("au", "predictor/au/1/model.pt", "tomas-gajarsky/facetorch-au-opengraph", 224, AU_LABELS),
    "va": PredictorSpec("va", "predictor/va/1/model.pt", "tomas-gajarsky/facetorch-va-elim", 224, VA_LABELS),
}


class FacetorchMissing(RuntimeError):
    """facetorch is not installed, or a model file is missing or unreadable; the message says what to do."""


def model_path(models_dir, spec: PredictorSpec) -> Path:
    """``spec``'s file in ``models_dir``, absolute (facetorch's downloader compares it with where the hub put the
    file, so both must be the same absolute path); it may not leave the folder."""
    folder = Path(os.path.abspath(Path(models_dir).expanduser()))
    path = Path(os.path.normpath(folder / spec.path))
    if not path.is_relative_to(folder):
        raise ValueError(f"{spec.path} leaves the facetorch models folder {folder}")
    return Path(os.path.realpath(folder)) / path.relative_to(folder)


def missing_files(models_dir) -> list[str]:
    """One line per model file that is not in ``models_dir``: where it goes and where it comes from."""
    return [f"{model_path(models_dir, spec)} (facetorch's {task} model: model.pt of the hub repository {spec.repo_id})"
            for task, spec in PREDICTORS.items() if not model_path(models_dir, spec).is_file()]


def _facetorch():
    try:
        from facetorch.analyzer.predictor import FacePredictor
        from facetorch.analyzer.predictor.post import PostArgMax, PostLabelConfidencePairs, PostMultiLabel
        from facetorch.analyzer.predictor.pre import PredictorPreProcessor
        from facetorch.downloader import DownloaderHuggingFace
    except ImportError as error:
        raise FacetorchMissing(
            f"Em. Acc., AU-MSE and VA-MSE need facetorch, which could not be imported ({error}). Install it "
            f"without its dependencies (facetorch 0.6.2 declares torch<2.4 and would replace your torch): {INSTALL}"
        ) from error
    return FacePredictor, PredictorPreProcessor, DownloaderHuggingFace, {
        "fer": lambda device, labels: PostArgMax(None, device, False, list(labels), dim=1),
        "au": lambda device, labels: PostMultiLabel(None, device, False, list(labels), dim=1, threshold=0.5),
        "va": lambda device, labels: PostLabelConfidencePairs(None, device, False, list(labels), offsets=[0, 0])}


def au_native_class(device) -> str | None:
    """The native module facetorch loads the AU model's weights into (CUDA), or None for TorchScript (CPU)."""
    import torch

    return AU_NATIVE_CLASS if torch.device(device).type == "cuda" else None


class FacetorchAnnotator:
    """facetorch's FER, AU and VA predictors; ``annotator(rgb, box)`` gives one picture's values.

    ``download``: let facetorch's own downloader fetch a missing file from the hub (otherwise a missing file
    stops here, naming it). ``au_native``: ``"auto"`` picks by device (:func:`au_native_class`), None loads the AU
    model as TorchScript, a dotted class name is the module facetorch loads its weights into."""

    def __init__(self, models_dir=DEFAULT_MODELS, device="cpu", download: bool = False, au_native: str | None = "auto"):
        import torch
        from torchvision import transforms

        FacePredictor, PredictorPreProcessor, DownloaderHuggingFace, postprocessors = _facetorch()
        missing = missing_files(models_dir)
        if missing and not download:
            raise FacetorchMissing(
                "facetorch's model files are missing:\n  " + "\n  ".join(missing) + "\nGive --facetorch-download to "
                "let facetorch's downloader fetch them from the Hugging Face hub into that folder, or put them there "
                "yourself (a folder facetorch filled, such as /opt/facetorch/models/torchscript, works as it is: "
                "--facetorch-models)")
        self.device = torch.device(device)
        self.models_dir = Path(models_dir)
        self.predictors = {}
        for task, spec in PREDICTORS.items():
            path = model_path(models_dir, spec)
            preprocessor = PredictorPreProcessor(
                transforms.Compose([transforms.Resize([spec.size, spec.size], antialias=True),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]), self.device, False)
            native = (au_native_class(self.device) if au_native == "auto" else au_native) if task == "au" else None
            downloader = DownloaderHuggingFace(spec.repo_id, str(path), repo_id=spec.repo_id, filename="model.pt")
            try:
                self.predictors[task] = FacePredictor(downloader, self.device, preprocessor,
                                                      postprocessors[task](self.device, spec.labels),
                                                      native_model_class=native)
            except Exception as error:  # the hub's and torch.jit's many errors, each named with its cause
                if not path.is_file():
                    raise FacetorchMissing(f"facetorch's downloader could not fetch {spec.repo_id}'s model.pt into "
                                           f"{path}: {error}") from error
                raise FacetorchMissing(f"{path} could not be loaded by facetorch ({type(error).__name__}: {error}); "
                                       "a download cut short or another file? Delete it and fetch it again "
                                       "(--facetorch-download)") from error

    def __call__(self, rgb: np.ndarray, box=None) -> dict:
        import torch

        faces = face_tensor(rgb, box).to(self.device)
        with torch.no_grad():
            fer = self.predictors["fer"].run(faces)[0]
            au = self.predictors["au"].run(faces)[0]
            va = self.predictors["va"].run(faces)[0]
        return {"facetorch_emotion": float(EMOTIONS.index(fer.label)),
                "facetorch_au": au.logits.detach().float().cpu().numpy().astype(np.float64),
                "facetorch_va": np.array([va.other["valence"], va.other["arousal"]], dtype=np.float64)}


def face_tensor(rgb: np.ndarray, box=None):
    """1 x 3 x 380 x 380 in [0, 1]: the face box (x0, y0, x1, y1 in pixels, rounded as facetorch rounds its
    detections and kept inside the picture) or the whole H x W x 3 uint8 picture, resized as facetorch's unifier
    resizes its faces."""
    import torch
    from torchvision.transforms import functional

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a picture must be H x W x 3; got {rgb.shape}")
    height, width = rgb.shape[:2]
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in torch.round(torch.as_tensor(np.asarray(box, dtype=np.float64)[:4])))
        x0, x1 = min(max(x0, 0), width), min(max(x1, 0), width)
        y0, y1 = min(max(y0, 0), height), min(max(y1, 0), height)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"the face box {list(box)[:4]} holds no pixel of a {width} x {height} picture")
        rgb = rgb[y0:y1, x0:x1]
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    return functional.resize(tensor, [UNIFIED_SIZE, UNIFIED_SIZE], antialias=True)


def _pairs(target, generated, width: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as float arrays, N values (``width`` None) or N x ``width``, finite and of the same shape."""
    t, g = np.asarray(target, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    t, g = (np.atleast_1d(t), np.atleast_1d(g)) if width is None else (np.atleast_2d(t), np.atleast_2d(g))
    shaped = t.ndim == 1 if width is None else (t.ndim == 2 and t.shape[1] == width)
    if not shaped or t.shape != g.shape or t.size == 0:
        raise ValueError(f"{name}: target and generated must both be N x {width or 1} values; got {t.shape} and {g.shape}")
    if not (np.isfinite(t).all() and np.isfinite(g).all()):
        raise ValueError(f"{name}: values must be finite")
    return t, g


def emotion_accuracy(target_classes, generated_classes) -> float:
    """Em. Acc. (%): the share of pairs whose generated picture gets the target picture's class (indices into
    :data:`EMOTIONS`)."""
    t, g = _pairs(target_classes, generated_classes, None, "emotion classes")
    if not (np.isin(t, range(len(EMOTIONS))).all() and np.isin(g, range(len(EMOTIONS))).all()):
        raise ValueError(f"emotion classes are one index 0-{len(EMOTIONS) - 1} per pair")
    return float(100.0 * np.mean(t == g))


def au_mse(target, generated) -> float:
    """AU-MSE: the mean over the 41 AU scores and the pairs of the squared difference (N x 41 each)."""
    t, g = _pairs(target, generated, len(AU_LABELS), "AU scores")
    return float(np.mean((t - g) ** 2))


def va_mse(target, generated) -> float:
    """VA-MSE: the mean over valence, arousal and the pairs of the squared difference (N x 2 each)."""
    t, g = _pairs(target, generated, len(VA_LABELS), "valence-arousal")
    return float(np.mean((t - g) ** 2))


# training.evaluate's set-level columns: field of an annotated picture -> {column: value over the pairs}.
SET_METRICS: Mapping = {
    "facetorch_emotion": lambda t, g: {"emotion_acc": emotion_accuracy(t, g)},
    "facetorch_au": lambda t, g: {"au_mse": au_mse(t, g)},
    "facetorch_va": lambda t, g: {"va_mse": va_mse(t, g)},
}
