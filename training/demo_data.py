"""A small demo data set for smoke runs, built from pictures that ship inside installed packages.

A smoke config (``data.demo_if_missing: true``) whose ``data.shards`` does not exist yet gets this
set written there, so ``python -m training.train --config training/configs/smoke.yaml`` works from
a fresh clone. It is a CPU check of the code paths, not training data:

- faces: fixed crops around the six faces of insightface's ``t1.jpg``, ``Tom_Hanks_54745.png`` and
  scikit-image's astronaut, each also mirrored (the mirror is the same person: ``person_id``, and the
  two form a two-frame clip, ``clip_id``, for stages that pair frames of a clip);
- ``id`` and EmojiDiff's 512-d ``faceid``: a stand-in recogniser (:func:`training.tiny.tiny_recognizer`: a
  fixed random projection of the downsampled crop), not ArcFace;
- EmojiDiff's ``local.jpg`` and ``clip_image`` (with the landmarks): the real local-image cut, embedded by a
  random tiny CLIP vision model (:func:`training.tiny.tiny_clip_vision`, a stand-in);
- ``flame``: SMIRK's expression-encoder architecture with random weights (a stand-in);
- ``emotion``: valence, arousal and 8 probabilities from a fixed random projection of the crop
  (:class:`StandInEmotion`, not EmoNet), for FaceCrafter's EMO module;
- ``landmarks`` / ``blendshapes`` / ``head_pose`` / ``face_mask``: the real MediaPipe model where it
  is cached on this machine (:func:`find_face_landmarker`), else left out and said so in the notes;
- latents: the config's tiny VAE, so cached latents match the smoke run's decoder.

The set is written like ``training.prepare`` writes one (shards, sidecars, ``manifest.json``), with
``"demo": true`` in its settings and a note saying what it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .annotate import (
    FaceMaskAnnotator,
    LandmarkAnnotator,
    LatentAnnotator,
    LocalImageAnnotator,
    Sample,
    SkipSample,
    SmirkAnnotator,
)
from .shards import MANIFEST, ShardWriter, shard_name, write_json_atomic

logger = logging.getLogger("training.demo_data")

# (picture, face box x0, y0, x1, y1 in its pixels, person). The three t1 boxes of the shared test
# data and three read off the picture by eye; generous crops absorb the difference.
DEMO_FACES = (
    ("t1.jpg", (55, 265, 170, 390), "t1-left"),
    ("t1.jpg", (280, 135, 385, 265), "t1-back"),
    ("t1.jpg", (460, 255, 595, 400), "t1-centre"),
    ("t1.jpg", (724, 367, 832, 474), "t1-laughing"),
    ("t1.jpg", (870, 67, 999, 196), "t1-standing"),
    ("t1.jpg", (1118, 283, 1226, 390), "t1-right"),
    ("Tom_Hanks_54745.png", (14, 14, 98, 98), "hanks"),
    ("astronaut", (165, 65, 280, 190), "astronaut"),
)
CROP_MARGIN = 1.8  # crop side / face box side: the whole head, as the aligned crops of prepare


def find_face_landmarker() -> Path | None:
    """MediaPipe's ``face_landmarker.task`` where the tests or ComfyUI keep it; None when not on this machine."""
    places = []
    cache = os.environ.get("EXPRESSION_ADAPTERS_TEST_CACHE")
    places.append(Path(cache) if cache else Path.home() / ".cache" / "expression_adapters_tests")
    places = [p / "mediapipe" / "face_landmarker.task" for p in places]
    comfyui = os.environ.get("COMFYUI_PATH")
    for root in ([Path(comfyui)] if comfyui else []) + [Path.home() / "ComfyUI", Path(__file__).resolve().parents[1]]:
        places.append(root / "models" / "mediapipe" / "face_landmarker.task")
    return next((p for p in places if p.is_file()), None)


def load_picture(name: str) -> np.ndarray:
    """A picture shipped in a package, RGB uint8."""
    import cv2

    if name == "astronaut":
        from skimage import data

        return np.ascontiguousarray(data.astronaut())
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / name
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(f"{path} (shipped with insightface) cannot be read")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def square_crop(image: np.ndarray, box, size: int, margin: float = CROP_MARGIN) -> np.ndarray:
    """A ``size`` x ``size`` crop centred on ``box``, side ``margin`` x the box's larger side (edges reflected)."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * margin
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = size / side
    matrix = np.float32([[scale, 0, size / 2 - cx * scale], [0, scale, size / 2 - cy * scale]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def demo_faces(resolution: int) -> list[tuple[np.ndarray, dict]]:
    """(crop, metadata) for every demo face and its mirror image."""
    pictures: dict[str, np.ndarray] = {}
    out = []
    for index, (picture, box, person) in enumerate(DEMO_FACES):
        if picture not in pictures:
            pictures[picture] = load_picture(picture)
        crop = square_crop(pictures[picture], box, resolution)
        for mirrored in (False, True):
            # a face and its mirror also form a two-frame "clip", so clip-pair stages (reference_lora) run too
            meta = {"source": f"demo:{picture}#{index}", "person_id": person, "mirrored": mirrored,
                    "clip_id": f"demo-{person}", "frame_index": int(mirrored), "time_s": 0.1 * mirrored, "demo": True}
            out.append((np.ascontiguousarray(crop[:, ::-1] if mirrored else crop), meta))
    return out


class StandInIdentity:
    """``id`` from :func:`training.tiny.tiny_recognizer` (a stand-in: not an ArcFace embedding)."""

    def __init__(self, dim: int, seed: int = 0, field: str = "id"):
        from .tiny import tiny_recognizer

        self.recognize = tiny_recognizer(dim, seed)
        self.field = field

    def __call__(self, sample: Sample) -> None:
        sample.arrays[self.field] = self.recognize(sample.crop)


class StandInEmotion:
    """``emotion`` (valence, arousal in -1..1, 8 probabilities) from a fixed random projection of the crop: not EmoNet."""

    def __init__(self, seed: int = 1):
        from .tiny import tiny_recognizer

        self.project = tiny_recognizer(10, seed)

    def __call__(self, sample: Sample) -> None:
        vector = self.project(sample.crop) * 3.0
        logits = vector[2:] - vector[2:].max()
        probabilities = np.exp(logits) / np.exp(logits).sum()
        sample.arrays["emotion"] = np.concatenate([np.tanh(vector[:2]), probabilities]).astype(np.float32)


def build_demo_data(out, config: Mapping, items_per_shard: int = 4) -> dict:
    """Write the demo set for ``config`` (its resolution, tiny VAE and ID width) into ``out``; returns the manifest."""
    import torch

    from encoders.smirk import SmirkExpressionEncoder

    from .prepare import Options, encode_sample, finish
    from .tiny import tiny_clip_vision, tiny_vae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolution = int(config["data"]["resolution"])
    model_cfg = config["model"]
    id_width = int((model_cfg.get("tiny_id_encoder") or {}).get("hidden_size", 32))
    notes = ["demo data: crops of pictures shipped in insightface and scikit-image, with a stand-in recogniser "
             "(id), a random-weight SMIRK-shaped encoder (flame) and a stand-in emotion (a random projection, not EmoNet); "
             "for smoke runs only"]
    torch.manual_seed(0)
    chain = [StandInIdentity(max(1, id_width // 2)), StandInIdentity(512, seed=1, field="faceid"), StandInEmotion()]
    landmarker_path, landmarker = find_face_landmarker(), None
    if landmarker_path is not None:
        from encoders.face_landmarks import FaceLandmarker

        landmarker = FaceLandmarker(str(landmarker_path), max_faces=1)
        chain.append(LandmarkAnnotator(landmarker, head_pose=True))
        chain.append(FaceMaskAnnotator())
        # EmojiDiff's fields: the local image, with a tiny random CLIP vision model's 1024-d embedding of it
        chain.append(LocalImageAnnotator(tiny_clip_vision({"seed": 0})))
        notes.append(f"landmarks, blendshapes, head pose and face-oval masks from the real MediaPipe model {landmarker_path}")
    else:
        notes.append("no cached MediaPipe face_landmarker.task: no landmarks/blendshapes in the demo set")
    chain.append(SmirkAnnotator(SmirkExpressionEncoder().eval()))
    vae_config = None
    if model_cfg.get("tiny_vae") is not None:
        vae = tiny_vae(model_cfg["tiny_vae"])
        vae_config = {"scaling_factor": float(vae.config.scaling_factor), "shift_factor": 0.0}
        chain.append(LatentAnnotator(vae))
    logger.warning("data.shards is missing: building a small DEMO set in %s (for smoke runs, not for training)", out)
    faces = demo_faces(resolution)
    options = Options(out=str(out), insightface="", smirk="", resolution=resolution, image_format="png")
    shards = [faces[k:k + items_per_shard] for k in range(0, len(faces), items_per_shard)]
    write_json_atomic({"settings": {"demo": True, "resolution": resolution, "id_width": id_width},
                       "shards": [[meta["source"] for _, meta in shard] for shard in shards]}, out / "plan.json")
    for shard_index, shard in enumerate(shards):
        writer = ShardWriter(out / shard_name(shard_index))
        skipped = []
        for item_index, (crop, meta) in enumerate(shard):
            key = f"s{shard_index:06d}-i{item_index:05d}-f000000"
            sample = Sample(crop, dict(meta, key=key, source_size=list(crop.shape[:2])), crop=crop,
                            crop_box=np.float32([0, 0, resolution, resolution]) / CROP_MARGIN
                            + resolution * (1 - 1 / CROP_MARGIN) / 2)
            try:
                for annotator in chain:
                    annotator(sample)
            except SkipSample as skip:
                skipped.append({"source": meta["source"], "frame_index": None, "reason": skip.reason})
                continue
            writer.add(key, encode_sample(sample, options),
                       {"person_id": meta["person_id"], "clip_id": meta["clip_id"], "time_s": meta["time_s"]})
        fields = sorted({field for s in writer.samples for field in s["members"]})
        writer.close({"items": len(shard), "skipped": skipped, "fields": fields, "notes": notes, "vae": vae_config})
    if landmarker is not None:
        landmarker.close()
    report = finish(out, len(shards))
    logger.warning("demo set: %d samples in %d shards (%s)", report["samples"], len(shards), out / MANIFEST)
    return report


def demo_folder(shards: str) -> Path:
    """The folder a missing ``data.shards`` (a manifest.json or a folder) names."""
    path = Path(shards)
    return path.parent if path.suffix == ".json" else path


def ensure_demo_data(config: Mapping) -> bool:
    """Build the demo set where a smoke config's data is missing; True when it was built."""
    data = config["data"]
    if not data.get("demo_if_missing") or Path(str(data["shards"])).exists():
        return False
    shards = Path(str(data["shards"]))
    if shards.suffix == ".json" and shards.name != MANIFEST:
        raise ValueError(f"data.demo_if_missing builds a prepare-style folder; data.shards must name its {MANIFEST} "
                         f"or the folder, not {shards}")
    build_demo_data(demo_folder(str(shards)), config)
    return True
