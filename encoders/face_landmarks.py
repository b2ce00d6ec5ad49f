"""MediaPipe FaceLandmarker (Tasks API): 478 landmarks, 52 blendshapes and the facial
transformation matrix for each image of a batch.

The model file is ``face_landmarker.task`` (:data:`FACE_LANDMARKER_URL`), kept in
``ComfyUI/models/mediapipe``. When an image holds several faces they are ordered largest first
(by the area of the landmarks' bounding box in pixels) and ``face_index`` picks one.

Running modes: "image" detects every image independently; "video" treats the batch as
consecutive video frames (MediaPipe tracks the face between frames; timestamps spaced by
``1000 / fps`` ms), which is steadier for per-frame expressions from a clip.

Small faces: MediaPipe's face detector is the short-range one; it misses faces that fill little of
the picture (group photos: it finds none of the six faces of insightface's 1280x886 ``t1.jpg``).
Given ``face_boxes`` (a face detector's boxes, e.g. insightface's), :meth:`FaceLandmarker.detect`
retries such images on a square crop around the chosen box, ``crop_scale`` times its larger side,
and maps the landmarks back to the whole picture.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import numpy as np
import torch

from .expressions import ARKIT_BLENDSHAPE_INDEX, ArkitBlendshapes, Landmarks
from .face_crops import to_image_batch
from .optional import require

logger = logging.getLogger(__name__)

FACE_LANDMARKER_FILE = "face_landmarker.task"
# Crop side / larger side of a detector's face box for the retry on crops. Our choice (not MediaPipe's):
# at 2 the face fills about half the crop, well inside the short-range detector's range, with the
# whole head and some margin for the landmarker.
DEFAULT_CROP_SCALE = 2.0
NO_FACE_HINT = (
    "MediaPipe's short-range face detector misses faces that fill little of the picture (group photos, "
    "distant faces). Connect a face analyzer (Load InsightFace) so faces it finds are retried on crops, "
    "or crop the face first"
)
FACE_LANDMARKER_URL = (
    "https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/latest/"
    "face_landmarker.task"
)


def face_landmarker_path(location: str | os.PathLike, file_name: str = FACE_LANDMARKER_FILE) -> str:
    """The model file: ``location`` itself if it is a file, else ``location/file_name``.

    Raises FileNotFoundError naming the folder, the file and the download URL.
    """
    location = os.fspath(location)
    if os.path.isfile(location):
        return location
    if location.endswith(".task"):
        folder, name = os.path.split(location)
    else:
        folder, name = location, file_name
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    raise FileNotFoundError(
        f"MediaPipe face landmarker model not found: no file '{name}' in the folder '{folder}'. "
        f"Download it from {FACE_LANDMARKER_URL} and put it in that folder (ComfyUI/models/mediapipe)."
    )


class FaceLandmarkerResult(NamedTuple):
    """One row per image: landmarks (B x 478 x 3), blendshapes (B x 52), matrices (B x 4 x 4),
    and for each image whether a face was found there (False rows were filled, see ``on_missing``)."""

    landmarks: Landmarks
    blendshapes: ArkitBlendshapes
    matrices: torch.Tensor
    found: list[bool]


def _face_order(face_landmarks, height: int, width: int, order: str = "largest") -> list[int]:
    """Indices of the detected faces: largest bounding box (in pixels) first, or (``order="centre"``)
    the one whose box centre lies nearest the image centre first."""
    keys = []
    for points in face_landmarks:
        xs = np.array([p.x for p in points]) * width
        ys = np.array([p.y for p in points]) * height
        if not len(xs):
            keys.append(float("inf"))
        elif order == "centre":
            keys.append(float(np.hypot((xs.min() + xs.max() - width) / 2, (ys.min() + ys.max() - height) / 2)))
        else:
            keys.append(-float((xs.max() - xs.min()) * (ys.max() - ys.min())))
    return sorted(range(len(keys)), key=lambda i: keys[i])


def result_rows(result, height: int, width: int, face_index: int = 0, order: str = "largest"):
    """Convert one MediaPipe ``FaceLandmarkerResult`` to (478 x 3, 52, 4 x 4) arrays, or None
    when it has no face number ``face_index`` (largest first, or nearest the centre first)."""
    faces = list(result.face_landmarks or [])
    order = _face_order(faces, height, width, order)
    if face_index >= len(order):
        return None
    chosen = order[face_index]
    points = faces[chosen]
    if len(points) != 478:
        raise ValueError(f"MediaPipe gave {len(points)} landmarks; expected 478 (a face_landmarker.task with irises)")
    landmarks = np.array([[p.x, p.y, p.z] for p in points], dtype=np.float32)
    blendshapes = np.zeros(52, dtype=np.float32)
    shapes = list(result.face_blendshapes or [])
    if chosen < len(shapes):
        for position, category in enumerate(shapes[chosen]):
            name = getattr(category, "category_name", None)
            index = ARKIT_BLENDSHAPE_INDEX.get(name, getattr(category, "index", None))
            if index is None:
                index = position
            blendshapes[int(index)] = float(category.score)
    else:
        logger.warning("MediaPipe returned no blendshapes; using zeros (is the model face_landmarker.task?)")
    matrices = list(result.facial_transformation_matrixes or [])
    matrix = np.asarray(matrices[chosen], dtype=np.float32).reshape(4, 4) if chosen < len(matrices) else np.eye(4, dtype=np.float32)
    return landmarks, np.clip(blendshapes, 0.0, 1.0), matrix


def crop_square(box, height: int, width: int, scale: float) -> tuple[int, int, int, int]:
    """Pixel bounds ``x0, y0, x1, y1`` of a square ``scale`` times the box's larger side, centred on the
    box and clipped to the picture (so it is not square at the borders)."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)[:4])
    half = max(x1 - x0, y1 - y0) * scale / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (max(0, int(round(cx - half))), max(0, int(round(cy - half))),
            min(width, int(round(cx + half))), min(height, int(round(cy + half))))


class NoFaceFound(ValueError):
    """MediaPipe found no face in (some) images of a batch."""


def _fill_missing(rows: list, found: list[bool], on_missing: str, hint: str = "") -> list:
    missing = [i for i, ok in enumerate(found) if not ok]
    if not missing:
        return rows
    if on_missing == "error" or all(not ok for ok in found):
        which = ", ".join(str(i + 1) for i in missing)
        raise NoFaceFound(
            f"no face found in image {which} of the batch (counting from 1)"
            + ("" if on_missing == "error" else "; no image of the batch has a face to copy from")
            + (f". {hint}" if hint else "")
        )
    if on_missing != "previous":
        raise ValueError(f"on_missing must be 'error' or 'previous'; got {on_missing!r}")
    filled = list(rows)
    first = next(i for i, ok in enumerate(found) if ok)
    for i in range(len(filled)):
        if not found[i]:
            filled[i] = filled[i - 1] if i > first else rows[first]
    logger.warning("no face in batch images %s (counting from 1); used the nearest earlier frame with a face",
                   [i + 1 for i in missing])
    return filled


class FaceLandmarker:
    """MediaPipe FaceLandmarker over image batches. Use as a context manager or call ``close()``."""

    def __init__(self, model: str | os.PathLike, max_faces: int = 4, min_detection_confidence: float = 0.5,
                 min_presence_confidence: float = 0.5, min_tracking_confidence: float = 0.5,
                 crop_scale: float = DEFAULT_CROP_SCALE):
        self.model_path = face_landmarker_path(model)
        self.max_faces = int(max_faces)
        if not (np.isfinite(crop_scale) and 1.0 <= crop_scale <= 8.0):
            raise ValueError(f"crop_scale must be a finite number from 1 to 8; got {crop_scale}")
        self.crop_scale = float(crop_scale)
        self.confidences = (float(min_detection_confidence), float(min_presence_confidence),
                            float(min_tracking_confidence))
        self._image_task = None

    def _create(self, video: bool):
        mp = require("mediapipe", "MediaPipe face landmarks")
        vision = require("mediapipe.tasks.python.vision", "MediaPipe face landmarks")
        base_options = require("mediapipe.tasks.python.core.base_options", "MediaPipe face landmarks")
        mode = vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE
        options = vision.FaceLandmarkerOptions(
            base_options=base_options.BaseOptions(model_asset_path=self.model_path),
            running_mode=mode,
            num_faces=self.max_faces,
            min_face_detection_confidence=self.confidences[0],
            min_face_presence_confidence=self.confidences[1],
            min_tracking_confidence=self.confidences[2],
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        try:
            return mp, vision.FaceLandmarker.create_from_options(options)
        except Exception as error:  # mediapipe raises RuntimeError/ValueError with C++ status text
            raise RuntimeError(
                f"could not load the MediaPipe face landmarker model {self.model_path}: {str(error).rstrip('.')}. "
                f"Download a fresh copy from {FACE_LANDMARKER_URL}"
            ) from error

    def _image_mode(self):
        if self._image_task is None:
            self._image_task = self._create(video=False)
        return self._image_task

    def detect_in_crop(self, frame: np.ndarray, box):
        """Rows (as :func:`result_rows`) for the face in a crop around ``box`` of one RGB uint8 frame,
        in the whole frame's normalised coordinates; None when MediaPipe finds no face there."""
        height, width = frame.shape[:2]
        x0, y0, x1, y1 = crop_square(box, height, width, self.crop_scale)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        mp, task = self._image_mode()
        crop = np.ascontiguousarray(frame[y0:y1, x0:x1])
        result = task.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=crop))
        # the face the box was drawn around is the one nearest the crop's centre; neighbours are cut off
        row = result_rows(result, y1 - y0, x1 - x0, 0, order="centre")
        if row is None:
            return None
        landmarks = row[0].copy()
        landmarks[:, 0] = (x0 + landmarks[:, 0] * (x1 - x0)) / width
        landmarks[:, 1] = (y0 + landmarks[:, 1] * (y1 - y0)) / height
        landmarks[:, 2] *= (x1 - x0) / width  # MediaPipe's z has the scale of x
        return landmarks, row[1], row[2]

    def detect(self, images, face_index: int = 0, running_mode: str = "image", fps: float = 30.0,
               on_missing: str = "error", face_boxes=None) -> FaceLandmarkerResult:
        """Landmarks, blendshapes and matrices for each image (B x H x W x 3, 0..1).

        ``on_missing``: "error" (default) raises naming the batch indices without a face;
        "previous" copies the nearest earlier frame that has one (for video).
        ``face_boxes``: optional callable, RGB uint8 H x W x 3 -> face boxes ``x0, y0, x1, y1`` in pixels,
        largest first (a face detector). Where MediaPipe finds no face in a whole image, the
        ``face_index``-th box is retried on a crop around it (see the module docstring).
        """
        if face_index < 0 or face_index >= self.max_faces:
            raise ValueError(f"face_index must be 0..{self.max_faces - 1}; got {face_index}")
        if running_mode not in ("image", "video"):
            raise ValueError(f"running_mode must be 'image' or 'video'; got {running_mode!r}")
        images = to_image_batch(images)
        batch, height, width, _ = images.shape
        frames = (images * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        video = running_mode == "video"
        mp, task = self._create(video=True) if video else self._image_mode()
        rows, found = [], []
        try:
            for k in range(batch):
                mp_image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frames[k]))
                if video:
                    result = task.detect_for_video(mp_image, int(round(k * 1000.0 / fps)))
                else:
                    result = task.detect(mp_image)
                row = result_rows(result, height, width, face_index)
                if row is None and face_boxes is not None:
                    boxes = list(face_boxes(frames[k]))
                    if face_index < len(boxes):
                        row = self.detect_in_crop(frames[k], boxes[face_index])
                        if row is not None:
                            logger.info("image %d: MediaPipe found no face in the whole picture; used a crop around "
                                        "face %d of %d the face detector found", k, face_index, len(boxes))
                found.append(row is not None)
                rows.append(row)
        finally:
            if video:
                task.close()
        hint = ("they were also retried on crops around the face detector's faces, without success"
                if face_boxes is not None else NO_FACE_HINT)
        rows = _fill_missing(rows, found, on_missing, hint)
        return FaceLandmarkerResult(
            Landmarks(torch.from_numpy(np.stack([r[0] for r in rows])), image_size=(height, width)),
            ArkitBlendshapes(torch.from_numpy(np.stack([r[1] for r in rows]))),
            torch.from_numpy(np.stack([r[2] for r in rows])),
            found,
        )

    def detect_each(self, images, face_index: int = 0) -> list[FaceLandmarkerResult | None]:
        """:meth:`detect` image by image: one single-image result per image, None where it has no face."""
        results = []
        for image in to_image_batch(images):
            try:
                results.append(self.detect(image[None], face_index=face_index))
            except NoFaceFound:
                results.append(None)
        return results

    def close(self) -> None:
        if self._image_task is not None:
            self._image_task[1].close()
            self._image_task = None

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Garbage collection runs wherever Python decides (inside ComfyUI's model loading, say), and there
        # MediaPipe's close() can wait forever on its dispatcher thread (seen with mediapipe 1.2: the whole
        # process hung). So a landmarker nobody closed is let go without waiting: its task's handle is
        # dropped, which turns MediaPipe's own close()/__del__ into no-ops; the process frees it at exit.
        # Close landmarkers explicitly (or use ``with``) to release them at once.
        if getattr(self, "_image_task", None) is not None:
            task = self._image_task[1]
            if hasattr(task, "_handle"):
                task._handle = None
            self._image_task = None


def detect_faces(model: str | os.PathLike, images, face_index: int = 0, running_mode: str = "image",
                 fps: float = 30.0, on_missing: str = "error", face_boxes=None, **options) -> FaceLandmarkerResult:
    """One-shot helper: load the model, detect, close."""
    with FaceLandmarker(model, max_faces=max(4, face_index + 1), **options) as landmarker:
        return landmarker.detect(images, face_index=face_index, running_mode=running_mode, fps=fps,
                                 on_missing=on_missing, face_boxes=face_boxes)


def analyzer_face_boxes(face_analyzer):
    """``face_boxes`` for :meth:`FaceLandmarker.detect` from an :class:`encoders.identity.FaceAnalyzer`
    (its detector takes BGR and returns its faces largest first)."""

    def boxes(frame_rgb: np.ndarray) -> list[np.ndarray]:
        return [face.box for face in face_analyzer.detect(np.ascontiguousarray(frame_rgb[:, :, ::-1]))]

    return boxes
