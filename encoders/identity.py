"""ArcFace identity embeddings from photos, as Arc2Face computes them.

Pipeline per image: insightface's SCRFD detector (antelopev2's ``scrfd_10g_bnkps.onnx``) finds
faces with 5 keypoints; the chosen face is aligned with insightface's ``norm_crop`` to a
112x112 BGR crop; the recogniser (Arc2Face's ``arcface.onnx``, else antelopev2's
``glintr100.onnx``) runs through insightface's ``ArcFaceONNX`` wrapper on onnxruntime, which
feeds the crop the way Arc2Face's own FaceAnalysis did (channels swapped to RGB, ``(x - 127.5) /
127.5``, NCHW); the 512-d output is L2-normalised.

Face order: the faces of an image are sorted by box area, largest first (ties keep the
detector's score order), so ``face_index=0`` is the largest face, as in Arc2Face's demo.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .images import bgr_to_image_tensor, to_bgr_uint8_list
from .optional import require

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
# Preference order: Arc2Face was trained on embeddings from its own arcface.onnx.
RECOGNIZER_FILES = ("arcface.onnx", "glintr100.onnx")
ANTELOPEV2_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip"
ARCFACE_URL = "https://huggingface.co/FoivosPar/Arc2Face/resolve/main/arcface.onnx"
MODEL_SOURCES = (
    f"{DETECTOR_FILE} and glintr100.onnx come in insightface's antelopev2 pack ({ANTELOPEV2_URL}, "
    f"unzip its files into the folder); arcface.onnx is Arc2Face's recogniser ({ARCFACE_URL})"
)

DEFAULT_DET_SIZE = 640
DEFAULT_DET_THRESH = 0.5
PROVIDER_CHOICES = ("auto", "cuda", "cpu")

# Cosine distance (1 - cosine similarity) to the mean identity above which a photo is dropped
# when averaging. Photos of one person typically have pairwise ArcFace similarity 0.4-0.8, which
# puts each within about 0.1-0.3 of the group's mean; a different person (similarity near 0)
# lands around 0.6-0.7 from a mean of 4-5 photos. 0.5 separates the two.
DEFAULT_OUTLIER_DISTANCE = 0.5


class FaceNotFoundError(ValueError):
    """No usable face in one image of a batch."""


@dataclass
class Detection:
    """One face: box ``x0, y0, x1, y1`` and 5 keypoints (eyes, nose, mouth corners) in pixels."""

    box: np.ndarray
    kps: np.ndarray
    score: float = 1.0

    def __post_init__(self):
        self.box = np.asarray(self.box, dtype=np.float32).reshape(-1)
        self.kps = np.asarray(self.kps, dtype=np.float32)
        self.score = float(self.score)
        if self.box.shape != (4,) or self.kps.shape != (5, 2):
            raise ValueError(
                f"a detection needs a box of 4 values and 5x2 keypoints; got box {self.box.shape}, "
                f"keypoints {self.kps.shape}"
            )
        if not (np.isfinite(self.box).all() and np.isfinite(self.kps).all()):
            raise ValueError("a detection has NaN or infinite coordinates")

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))


@dataclass
class FaceResult:
    """The chosen face of one image: its embedding (L2-normalised), geometry and aligned BGR crop."""

    image_index: int
    face_index: int
    faces_found: int
    embedding: np.ndarray
    box: np.ndarray
    kps: np.ndarray
    det_score: float
    crop: np.ndarray


@dataclass
class AveragedIdentity:
    """Mean identity of several photos; ``distances`` are each photo's cosine distance to the mean of all."""

    embedding: np.ndarray
    kept: list[int]
    rejected: list[int]
    distances: np.ndarray


@dataclass
class IdentityBatch:
    """What the Face Embed node needs: embeddings (B x 512, or 1 x 512 averaged) and RGB crop previews."""

    embeddings: torch.Tensor
    crops: torch.Tensor
    faces: list[FaceResult]
    average: AveragedIdentity | None = field(default=None)


def sort_by_area(detections: Sequence[Detection]) -> list[Detection]:
    """Largest box first; Python's sort is stable, so equal areas keep the detector's order."""
    return sorted(detections, key=lambda detection: -detection.area)


def onnx_providers(provider: str = "auto") -> list[str]:
    """onnxruntime execution providers: ``auto`` is CUDA when onnxruntime has it, else CPU."""
    ort = require("onnxruntime", "Face analysis")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if provider == "cpu" or (provider == "auto" and not has_cuda):
        return ["CPUExecutionProvider"]
    if provider in ("auto", "cuda"):
        if not has_cuda:
            raise RuntimeError(
                "provider 'cuda' was asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}). Install onnxruntime-gpu in place of onnxruntime, "
                "or choose 'cpu'."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")


def _resolve_folder(folder: Path) -> Path:
    # The antelopev2 zip holds a folder of the same name, so unzipping into antelopev2/ nests it.
    nested = folder / "antelopev2"
    if not (folder / DETECTOR_FILE).is_file() and (nested / DETECTOR_FILE).is_file():
        return nested
    return folder


def find_model_files(folder, recognizer: str | None = None) -> tuple[Path, Path]:
    """The detector and recogniser files of an antelopev2-style folder.

    ``recognizer``: None picks ``arcface.onnx`` when present, else ``glintr100.onnx``; a name is
    looked up in the folder; an absolute path is used as is.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"InsightFace model folder {folder} does not exist. It must contain {DETECTOR_FILE} and "
            f"one of {' or '.join(RECOGNIZER_FILES)}: {MODEL_SOURCES}."
        )
    folder = _resolve_folder(folder)
    if recognizer:
        candidate = Path(recognizer).expanduser()
        candidates = [candidate if candidate.is_absolute() else folder / candidate]
    else:
        candidates = [folder / name for name in RECOGNIZER_FILES]
    recognizer_path = next((path for path in candidates if path.is_file()), None)
    detector_path = folder / DETECTOR_FILE
    missing = []
    if not detector_path.is_file():
        missing.append(DETECTOR_FILE)
    if recognizer_path is None:
        missing.append(" or ".join(str(path.name if path.parent == folder else path) for path in candidates))
    if missing:
        present = sorted(path.name for path in folder.glob("*.onnx"))
        raise FileNotFoundError(
            f"InsightFace model folder {folder} is missing {' and '.join(missing)} "
            f"(it has: {', '.join(present) or 'no .onnx files'}). {MODEL_SOURCES}."
        )
    return detector_path, recognizer_path


def _load_zoo_model(path: Path, providers: list[str], task: str):
    insightface = require("insightface", "Face analysis")
    try:
        model = insightface.model_zoo.get_model(str(path), providers=providers)
    except Exception as error:
        raise RuntimeError(f"could not load the {task} model {path}: {error}") from error
    if model is None or getattr(model, "taskname", None) != task:
        found = getattr(model, "taskname", "an unrecognised model")
        raise ValueError(f"{path} is not a face {task} model (insightface reads it as {found})")
    return model


class FaceAnalyzer:
    """Detection, alignment and ArcFace recognition; see the module docstring for the order of faces.

    Built without a detector, it needs detections passed to :meth:`analyze`.
    """

    def __init__(
        self,
        recognizer_path,
        detector_path=None,
        *,
        det_size: int = DEFAULT_DET_SIZE,
        det_thresh: float = DEFAULT_DET_THRESH,
        provider: str = "auto",
    ):
        if int(det_size) <= 0 or int(det_size) % 32:
            raise ValueError(f"det_size must be a positive multiple of 32 (SCRFD's largest stride); got {det_size}")
        self.det_size = int(det_size)
        self.det_thresh = float(det_thresh)
        self.providers = onnx_providers(provider)
        self.recognizer_path = Path(recognizer_path)
        self.detector_path = Path(detector_path) if detector_path is not None else None
        for path in filter(None, (self.recognizer_path, self.detector_path)):
            if not path.is_file():
                raise FileNotFoundError(f"model file {path} does not exist. {MODEL_SOURCES}.")
        self.recognizer = _load_zoo_model(self.recognizer_path, self.providers, "recognition")
        self.crop_size = int(self.recognizer.input_size[0])
        if self.crop_size % 112 and self.crop_size % 128:
            raise ValueError(
                f"recogniser {self.recognizer_path} takes {self.recognizer.input_size} inputs; "
                "ArcFace alignment needs a square multiple of 112 (or 128)"
            )
        self.detector = None
        if self.detector_path is not None:
            self.detector = _load_zoo_model(self.detector_path, self.providers, "detection")
            self.detector.prepare(0, input_size=(self.det_size, self.det_size), det_thresh=self.det_thresh)

    @classmethod
    def from_folder(
        cls,
        folder,
        *,
        recognizer: str | None = None,
        det_size: int = DEFAULT_DET_SIZE,
        det_thresh: float = DEFAULT_DET_THRESH,
        provider: str = "auto",
    ) -> FaceAnalyzer:
        """Load from an antelopev2-style folder (``ComfyUI/models/insightface/models/antelopev2``)."""
        detector_path, recognizer_path = find_model_files(folder, recognizer)
        return cls(recognizer_path, detector_path, det_size=det_size, det_thresh=det_thresh, provider=provider)

    def __repr__(self) -> str:
        detector = self.detector_path.name if self.detector_path else "none"
        return (
            f"FaceAnalyzer(recognizer={self.recognizer_path.name}, detector={detector}, "
            f"det_size={self.det_size}, providers={self.providers})"
        )

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """Faces in one BGR uint8 image, largest first."""
        if self.detector is None:
            raise RuntimeError(
                f"this FaceAnalyzer was built without a detector ({DETECTOR_FILE}); pass detections to analyze()"
            )
        boxes, kpss = self.detector.detect(image_bgr, input_size=(self.det_size, self.det_size))
        if len(boxes) == 0:
            return []
        if kpss is None:
            raise ValueError(f"detector {self.detector_path} gives no 5-point keypoints, which alignment needs")
        return sort_by_area([Detection(box[:4], kps, box[4]) for box, kps in zip(boxes, kpss)])

    def align(self, image_bgr: np.ndarray, detection: Detection) -> np.ndarray:
        """The ArcFace-aligned square BGR crop (112x112 for the usual recognisers)."""
        face_align = require("insightface.utils.face_align", "Face alignment")
        with warnings.catch_warnings():
            # insightface calls scikit-image's deprecated SimilarityTransform.estimate; users can't act on it
            warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
            return face_align.norm_crop(image_bgr, landmark=detection.kps, image_size=self.crop_size)

    def embed_crop(self, crop_bgr: np.ndarray, label: str = "face") -> np.ndarray:
        """L2-normalised float32 embedding of one aligned BGR crop."""
        # One crop per run: some exported recognisers have a fixed batch of 1.
        feature = np.asarray(self.recognizer.get_feat(crop_bgr), dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(feature)) if np.isfinite(feature).all() else float("nan")
        if not np.isfinite(norm) or norm == 0.0:
            raise ValueError(
                f"the recogniser {self.recognizer_path.name} gave a {'zero' if norm == 0.0 else 'non-finite'} "
                f"embedding for {label}; the model file may be damaged or not an ArcFace recogniser"
            )
        return feature / norm

    def analyze(self, images, face_index: int = 0, detections=None) -> list[FaceResult]:
        """One :class:`FaceResult` per image: the ``face_index``-th largest face.

        ``images``: a ComfyUI IMAGE tensor, a numpy batch or a list (see :mod:`encoders.images`).
        ``detections``: optional, one sequence of :class:`Detection` per image, used instead of
        the detector (they are ordered by area like detected faces).
        """
        if face_index < 0:
            raise ValueError(f"face_index must be 0 or more; got {face_index}")
        images_bgr = to_bgr_uint8_list(images)
        if detections is not None and len(detections) != len(images_bgr):
            raise ValueError(f"{len(detections)} detection lists given for {len(images_bgr)} images")
        results = []
        for index, image in enumerate(images_bgr):
            if detections is None:
                faces = self.detect(image)
                where = f"detection size {self.det_size}x{self.det_size}, threshold {self.det_thresh}"
            else:
                faces = sort_by_area([d if isinstance(d, Detection) else Detection(*d) for d in detections[index]])
                where = "no detections were given for it"
            if not faces:
                raise FaceNotFoundError(
                    f"No face found in image {index + 1} of {len(images_bgr)} ({where}). Use a photo where the "
                    "face is clearly visible, or try another detection size."
                )
            if face_index >= len(faces):
                raise FaceNotFoundError(
                    f"Image {index + 1}: face_index {face_index} asked for, but {len(faces)} face(s) were found "
                    f"({where}); faces are numbered by box area, largest first, from 0."
                )
            face = faces[face_index]
            crop = self.align(image, face)
            embedding = self.embed_crop(crop, f"image {index + 1}")
            results.append(
                FaceResult(index, face_index, len(faces), embedding, face.box, face.kps, face.score, crop)
            )
        return results


def average_identity(embeddings, outlier_distance: float | None = None) -> AveragedIdentity:
    """One identity from several photos of a person: the re-normalised mean of the normalised embeddings.

    With ``outlier_distance`` set (see :data:`DEFAULT_OUTLIER_DISTANCE`) and at least 3 photos,
    photos whose cosine distance to the mean of all exceeds it are dropped and the mean is taken
    again over the rest. With 2 photos both are equally far from their mean, so none is dropped.
    """
    vectors = np.asarray(embeddings, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"embeddings must be N x D with N >= 1; got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = [int(i) for i in np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))]
    if bad:
        raise ValueError(f"embeddings {bad} are zero or not finite")
    vectors = vectors / norms
    mean = vectors.mean(axis=0)
    mean_norm = np.linalg.norm(mean)
    if mean_norm < 1e-8:
        raise ValueError("the embeddings cancel out; their mean has no direction")
    distances = 1.0 - vectors @ (mean / mean_norm)
    kept = list(range(len(vectors)))
    if outlier_distance is not None and len(vectors) >= 3:
        kept = [i for i in kept if distances[i] <= outlier_distance]
        if not kept:
            raise ValueError(
                f"every photo is farther than {outlier_distance} (cosine distance) from the mean identity "
                f"(distances {np.round(distances, 3).tolist()}); they may show different people"
            )
        mean = vectors[kept].mean(axis=0)
        mean_norm = np.linalg.norm(mean)
    rejected = [i for i in range(len(vectors)) if i not in kept]
    return AveragedIdentity((mean / mean_norm).astype(np.float32), kept, rejected, distances.astype(np.float32))


def embed_identity(
    analyzer: FaceAnalyzer,
    images,
    *,
    face_index: int = 0,
    average: bool = False,
    outlier_distance: float | None = None,
    detections=None,
) -> IdentityBatch:
    """Embeddings of a batch of photos (B x D, or 1 x D when ``average``) and their aligned crops as an IMAGE."""
    faces = analyzer.analyze(images, face_index=face_index, detections=detections)
    stacked = np.stack([face.embedding for face in faces])
    averaged = average_identity(stacked, outlier_distance) if average else None
    vectors = averaged.embedding[None] if averaged is not None else stacked
    crops = bgr_to_image_tensor([face.crop for face in faces])
    return IdentityBatch(torch.from_numpy(np.ascontiguousarray(vectors)), crops, faces, averaged)
