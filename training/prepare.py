"""``python -m training.prepare``: annotate face images and video clips into training shards.

    python -m training.prepare data/raw --out data/shards \\
        --insightface models/insightface/models/antelopev2 --smirk models/smirk/SMIRK_em1.pt \\
        [--landmarker models/mediapipe/face_landmarker.task] [--vae models/vae/sd-vae-ft-mse] \\
        [--resolution 512] [--items-per-shard 1000] [--workers 4] \\
        [--num-processes 8 --process-index 3] [--max-shards 10]

Inputs: folders (searched recursively) or list files (``.txt``, one path per line, relative to
the list's folder). Each image is one item; each video clip is one item whose sampled frames
stay together in one shard (with clip id, frame index and time, so reference/target pairs can be
drawn within a short window). Items are sorted, then cut into shards of ``--items-per-shard``;
shard k belongs to process ``k % num_processes``, so machines split the work with no
coordination. A finished shard has its index ``shard-k.json``; reruns skip those and redo the
others, so an interrupted run resumes. Unreadable files and images without a face are skipped and
counted (``report.json``). When every shard is done, ``manifest.json`` lists them for training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .annotate import (
    EmotionAnnotator,
    FaceAnnotator,
    FaceIdAnnotator,
    FaceMaskAnnotator,
    LandmarkAnnotator,
    LatentAnnotator,
    LocalImageAnnotator,
    Sample,
    SkipSample,
    SmirkAnnotator,
)
from .shards import MANIFEST, ShardWriter, npy_bytes, shard_name, sidecar_path, write_json_atomic

logger = logging.getLogger("training.prepare")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
PLAN = "plan.json"
REPORT = "report.json"


@dataclass
class Options:
    out: str
    insightface: str
    smirk: str
    recognizer: str | None = None
    landmarker: str | None = None
    vae: str | None = None
    resolution: int = 512
    items_per_shard: int = 1000
    image_format: str = "jpg"
    jpeg_quality: int = 95
    face_index: int = 0
    det_size: int = 640
    provider: str = "auto"
    device: str = "cpu"
    smirk_channel_order: str = "RGB"
    video_frame_step: int = 1
    max_frames_per_clip: int = 0
    # Optional fields (off by default; see training/README.md):
    person_from: str = "none"  # none | folder (the file's parent folder) | clip (clip id); --person-list overrides
    person_list: str | None = None
    faceid_recognizer: str | None = None  # a second recogniser file, e.g. buffalo_l w600k_r50.onnx -> faceid
    head_pose: bool = False
    local_image: bool = False
    clip_vision: str | None = None  # CLIPVisionModelWithProjection folder -> clip_image (implies local_image)
    emonet: str | None = None  # EmoNet checkpoint -> emotion
    face_mask: bool = False
    mask_size: int = 64
    face_parser: str = "oval"  # oval (MediaPipe) | bisenet | parsenet (facexlib, --face-parsing-model)
    face_parsing_model: str | None = None
    # EmojiDiff's data cleaning: drop pictures whose LIQE score is below min_liqe (0: off)
    liqe_weights: str | None = None
    min_liqe: float = 0.0


# Options added after the first release: left out of a plan at their defaults, so folders
# prepared before keep resuming.
LATER_OPTIONS = ("person_from", "person_list", "faceid_recognizer", "head_pose", "local_image", "clip_vision",
                 "emonet", "face_mask", "mask_size", "face_parser", "face_parsing_model", "liqe_weights", "min_liqe")


# --- inputs ---------------------------------------------------------------------------------

def list_items(inputs: list[str]) -> list[str]:
    """All image and video paths named by ``inputs`` (folders, list files, files), sorted, unique."""
    found = set()
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found.update(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        elif path.suffix.lower() == ".txt" and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    item = Path(line)
                    found.add(str(item if item.is_absolute() else path.parent / item))
        elif path.exists():
            found.add(str(path))
        else:
            raise FileNotFoundError(f"input {entry} does not exist")
    return sorted(found)


def is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_image(path: str) -> np.ndarray | None:
    """RGB uint8, or None when the file cannot be decoded."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if image is None else np.ascontiguousarray(image[:, :, ::-1])


def read_video(path: str, step: int, max_frames: int) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index, time in seconds, RGB frame) for every ``step``-th frame."""
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        return
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    index = kept = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % step == 0:
                yield index, index / fps, np.ascontiguousarray(frame[:, :, ::-1])
                kept += 1
                if max_frames and kept >= max_frames:
                    break
            index += 1
    finally:
        capture.release()


def clip_id(path: str) -> str:
    """A stable id of a clip: its file name plus a short hash of the full path (names repeat across folders)."""
    return f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


# --- annotation -----------------------------------------------------------------------------

class QualityFilter:
    """EmojiDiff's data cleaning ([ED §4 Dataset]: LIQE filters out low-quality images, then faces are cropped).

    ``score(rgb) -> float`` (LIQE: 1 bad .. 5 excellent) rates the whole picture, as the paper filters images
    before cropping; a picture below ``minimum`` is skipped as ``low_quality``. Kept samples record their
    score (metadata ``liqe``), so a threshold can be chosen from the scores of a first run.
    """

    name = "quality"

    def __init__(self, score, minimum: float):
        self.score, self.minimum = score, float(minimum)

    def __call__(self, sample: Sample) -> None:
        value = float(self.score(sample.image))
        if value < self.minimum:
            raise SkipSample("low_quality", f"LIQE {value:.3f} < {self.minimum}")
        sample.meta["liqe"] = round(value, 4)


def quality_filter(options: Options) -> QualityFilter:
    """LIQE through the evaluation's loader (training.metrics.liqe_scorer); a missing file stops the run."""
    from . import metrics

    if not options.liqe_weights:
        raise SystemExit("--min-liqe needs --liqe-weights (pyiqa's LIQE weights file)")
    try:
        return QualityFilter(metrics.liqe_scorer(options.liqe_weights, options.device), options.min_liqe)
    except metrics.OptionalMetricMissing as error:
        raise SystemExit(f"--min-liqe: {error}") from None


def face_mask_annotator(options: Options) -> FaceMaskAnnotator:
    """The AD loss's face mask: MediaPipe's face oval, or a facexlib face-parsing network (training/face_parsing.py)."""
    if options.face_parser == "oval":
        return FaceMaskAnnotator(size=options.mask_size)
    from .face_parsing import FaceParser

    return FaceMaskAnnotator(FaceParser.from_file(options.face_parsing_model, options.face_parser, options.device),
                             size=options.mask_size)


class Annotators:
    """The annotator chain, built once per worker process."""

    def __init__(self, options: Options):
        from encoders.identity import FaceAnalyzer
        from encoders.smirk import load_smirk_encoder

        self.notes = []
        # the quality filter runs first: a dropped picture costs no face detection
        chain = [quality_filter(options)] if options.min_liqe else []
        analyzer = FaceAnalyzer.from_folder(options.insightface, recognizer=options.recognizer,
                                            det_size=options.det_size, provider=options.provider)
        chain.append(FaceAnnotator(analyzer, options.resolution, options.face_index))
        if options.faceid_recognizer:
            chain.append(FaceIdAnnotator(FaceAnalyzer(options.faceid_recognizer, provider=options.provider)))
        if options.landmarker:
            from encoders.face_landmarks import FaceLandmarker

            chain.append(LandmarkAnnotator(FaceLandmarker(options.landmarker, max_faces=1), head_pose=options.head_pose))
        else:
            self.notes.append("no --landmarker given: samples have no 'landmarks'/'blendshapes' and SMIRK crops "
                              "come from the detector's face box instead of MediaPipe landmarks")
            for flag in ("head_pose", "local_image", "clip_vision", "face_mask"):
                if getattr(options, flag) and not (flag == "face_mask" and options.face_parser != "oval"):
                    raise SystemExit(f"--{flag.replace('_', '-')} needs MediaPipe landmarks: give --landmarker too")
        chain.append(SmirkAnnotator(load_smirk_encoder(options.smirk, options.device), options.smirk_channel_order))
        if options.local_image or options.clip_vision:
            clip = None
            if options.clip_vision:
                from transformers import CLIPVisionModelWithProjection

                clip = CLIPVisionModelWithProjection.from_pretrained(options.clip_vision, local_files_only=True)
            chain.append(LocalImageAnnotator(clip, device=options.device))
        if options.emonet:
            from encoders.emotion import load_emonet

            chain.append(EmotionAnnotator(load_emonet(options.emonet, options.device)))
        if options.face_mask:
            chain.append(face_mask_annotator(options))
        self.vae_config = None
        if options.vae:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(options.vae, local_files_only=True)
            self.vae_config = {"scaling_factor": float(vae.config.scaling_factor),
                               "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0)}
            chain.append(LatentAnnotator(vae, options.device))
        self.chain = chain

    def __call__(self, sample: Sample) -> None:
        for annotator in self.chain:
            annotator(sample)


def encode_sample(sample: Sample, options: Options) -> dict[str, bytes]:
    import cv2

    bgr = np.ascontiguousarray(sample.crop[:, :, ::-1])
    if options.image_format == "png":
        ok, image = cv2.imencode(".png", bgr)
    else:
        ok, image = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
    if not ok:
        raise RuntimeError("could not encode the crop")
    files = {options.image_format: image.tobytes(), "json": json.dumps(sample.meta).encode()}
    for name, array in sample.arrays.items():
        files[f"{name}.npy"] = npy_bytes(array)
    for name, rgb in sample.files.items():
        ok, data = cv2.imencode(Path(name).suffix, np.ascontiguousarray(rgb[:, :, ::-1]))
        if not ok:
            raise RuntimeError(f"could not encode {name}")
        files[name] = data.tobytes()
    return files


def read_person_list(path) -> dict[str, str]:
    """``path,person`` (or tab-separated) lines -> {resolved path: person}; paths relative to the list's folder."""
    path = Path(path)
    persons = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.rsplit(",", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise SystemExit(f"{path} line {number}: expected 'path,person' (or a tab between them); got {line!r}")
        item = Path(parts[0].strip())
        persons[str((item if item.is_absolute() else path.parent / item).resolve())] = parts[1].strip()
    return persons


def person_id(item: str, clip: str | None, options: Options, persons: dict[str, str] | None) -> str | None:
    """The person of an item: the list's entry, else by ``person_from`` (folder name or clip id), else None."""
    if persons is not None and str(Path(item).resolve()) in persons:
        return persons[str(Path(item).resolve())]
    if options.person_from == "folder":
        return Path(item).parent.name or None
    if options.person_from == "clip":
        return clip
    return None


def frames_of(item: str, options: Options) -> Iterator[tuple[dict, np.ndarray | None]]:
    """(metadata, RGB image or None when unreadable) for each image/frame of an item."""
    if is_video(item):
        clip = clip_id(item)
        count = 0
        for frame_index, time_s, frame in read_video(item, options.video_frame_step, options.max_frames_per_clip):
            count += 1
            yield {"source": item, "clip_id": clip, "frame_index": frame_index, "time_s": round(time_s, 4)}, frame
        if count == 0:
            yield {"source": item, "clip_id": clip, "frame_index": None}, None
    else:
        yield {"source": item, "clip_id": None, "frame_index": None}, read_image(item)


_WORKER: dict = {}


def _worker_annotators(options: Options) -> Annotators:
    """One annotator chain per process and option set (models load once, not once per shard)."""
    key = json.dumps(asdict(options), sort_keys=True)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        _WORKER.update(key=key, annotators=Annotators(options))
    return _WORKER["annotators"]


def _init_worker(workers: int) -> None:
    """Share the cores among the workers: each one's torch and onnxruntime would take them all."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def process_shard(shard_index: int, items: list[str], options: Options) -> dict:
    """Annotate ``items`` into shard ``shard_index``; returns its sidecar record."""
    annotators = _worker_annotators(options)
    persons = read_person_list(options.person_list) if options.person_list else None
    writer = ShardWriter(Path(options.out) / shard_name(shard_index))
    skipped = []
    try:
        for item_index, item in enumerate(items):
            for meta, image in frames_of(item, options):
                frame = meta["frame_index"] or 0
                key = f"s{shard_index:06d}-i{item_index:05d}-f{frame:06d}"
                if image is None:
                    skipped.append({"source": item, "frame_index": meta["frame_index"], "reason": "corrupt"})
                    continue
                person = person_id(item, meta["clip_id"], options, persons)
                sample = Sample(image, dict(meta, key=key, source_size=list(image.shape[:2]), person_id=person))
                try:
                    annotators(sample)
                except SkipSample as skip:
                    skipped.append({"source": item, "frame_index": meta["frame_index"], "reason": skip.reason})
                    continue
                info = {"clip_id": meta["clip_id"], "time_s": meta.get("time_s")} if meta["clip_id"] else {}
                writer.add(key, encode_sample(sample, options), info | ({"person_id": person} if person else {}))
    except BaseException:
        writer.abort()
        raise
    fields = sorted({field for sample in writer.samples for field in sample["members"]})
    return writer.close({"items": len(items), "skipped": skipped, "fields": fields, "notes": annotators.notes,
                         "vae": annotators.vae_config})


# --- the run --------------------------------------------------------------------------------

def make_plan(items: list[str], options: Options) -> dict:
    shards = [items[k:k + options.items_per_shard] for k in range(0, len(items), options.items_per_shard)]
    defaults = Options(out="", insightface="", smirk="")
    settings = {k: v for k, v in asdict(options).items() if k not in ("out", "provider", "device")
                and not (k in LATER_OPTIONS and v == getattr(defaults, k))}
    return {"settings": settings, "shards": shards}


def load_or_write_plan(out: Path, plan: dict) -> dict:
    """The first run's plan is kept: a rerun with other inputs or settings would mix two datasets."""
    path = out / PLAN
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing != plan:
            changed = "settings" if existing["settings"] != plan["settings"] else "input files"
            raise SystemExit(f"{out} was prepared with other {changed}; use a new --out folder or the original inputs")
        return existing
    write_json_atomic(plan, path)
    return plan


def run_prepare(inputs: list[str], options: Options, num_processes: int = 1, process_index: int = 0,
                workers: int = 0, max_shards: int = 0, progress: bool = True,
                on_shard_done: Callable[[dict], None] | None = None) -> dict:
    """Prepare this process's shards; returns the report (and writes the manifest when all are done)."""
    from tqdm import tqdm

    if not 0 <= process_index < num_processes:
        raise SystemExit(f"--process-index must be 0..{num_processes - 1}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    items = list_items(inputs)
    if not items:
        raise SystemExit(f"no images or videos found in {', '.join(inputs)}")
    plan = load_or_write_plan(out, make_plan(items, options))
    mine = [k for k in range(len(plan["shards"])) if k % num_processes == process_index]
    todo = [k for k in mine if not sidecar_path(out / shard_name(k)).is_file()]
    if max_shards:
        todo = todo[:max_shards]
    logger.info("%d items in %d shards; this process: %d shards, %d already done, %d to do now",
                len(items), len(plan["shards"]), len(mine), len(mine) - len(todo), len(todo))
    bar = tqdm(total=len(todo), desc="shards", unit="shard", disable=not progress)
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        if options.min_liqe:
            quality_filter(options)  # a missing LIQE file is said here: a worker's SystemExit would hang the pool

        # spawn: onnxruntime and torch threads do not survive fork
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (workers,)) as pool:
            jobs = [pool.apply_async(process_shard, (k, plan["shards"][k], options)) for k in todo]
            for job in jobs:
                record = job.get()
                bar.update(1)
                if on_shard_done:
                    on_shard_done(record)
    else:
        for k in todo:
            record = process_shard(k, plan["shards"][k], options)
            bar.update(1)
            if on_shard_done:
                on_shard_done(record)
    bar.close()
    return finish(out, len(plan["shards"]))


def finish(out: Path, num_shards: int) -> dict:
    """Aggregate the finished shards into report.json, and manifest.json once all are finished."""
    records = []
    for k in range(num_shards):
        sidecar = sidecar_path(out / shard_name(k))
        if sidecar.is_file():
            records.append(json.loads(sidecar.read_text(encoding="utf-8")))
    reasons = Counter(entry["reason"] for record in records for entry in record["skipped"])
    report = {
        "shards_done": len(records),
        "shards_total": num_shards,
        "samples": sum(record["num_samples"] for record in records),
        "items": sum(record["items"] for record in records),
        "skipped": dict(reasons),
        "skipped_files": [entry for record in records for entry in record["skipped"]],
        "notes": sorted({note for record in records for note in record.get("notes", [])}),
    }
    write_json_atomic(report, out / REPORT)
    if len(records) == num_shards:
        vae = next((record["vae"] for record in records if record.get("vae")), None)
        manifest = {
            "format": 1,
            "shards": [record["shard"] for record in records],
            "num_samples": report["samples"],
            "fields": sorted({field for record in records for field in record["fields"]}),
            "vae": vae,
            "settings": json.loads((out / PLAN).read_text(encoding="utf-8"))["settings"],
            "notes": report["notes"],
        }
        write_json_atomic(manifest, out / MANIFEST)
        report["manifest"] = str(out / MANIFEST)
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="folders, list files (.txt) or single images/videos")
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and report.json")
    parser.add_argument("--insightface", required=True, help="antelopev2-style folder: scrfd_10g_bnkps.onnx + arcface.onnx")
    parser.add_argument("--recognizer", help="recogniser file name in that folder (default arcface.onnx, else glintr100.onnx)")
    parser.add_argument("--smirk", required=True, help="SMIRK_em1.pt")
    parser.add_argument("--landmarker", help="MediaPipe face_landmarker.task (landmarks + blendshapes; optional)")
    parser.add_argument("--vae", help="diffusers AutoencoderKL folder: store latents so training skips the encoder")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--items-per-shard", type=int, default=1000)
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--face-index", type=int, default=0, help="0 = largest face")
    parser.add_argument("--det-size", type=int, default=640)
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--device", default="cpu", help="torch device for SMIRK and the VAE")
    parser.add_argument("--smirk-channel-order", choices=("RGB", "BGR"), default="RGB")
    parser.add_argument("--video-frame-step", type=int, default=1, help="keep every n-th video frame")
    parser.add_argument("--max-frames-per-clip", type=int, default=0)
    extra = parser.add_argument_group("optional fields (EmojiDiff / FaceCrafter training)")
    extra.add_argument("--person-from", choices=("none", "folder", "clip"), default="none",
                       help="person_id of each sample: the file's parent folder name, or the clip id (default none)")
    extra.add_argument("--person-list", help="a file of 'path,person' lines giving person_id (overrides --person-from)")
    extra.add_argument("--faceid-recognizer", help="a second recogniser .onnx (buffalo_l w600k_r50.onnx) -> faceid")
    extra.add_argument("--head-pose", action="store_true", help="head_pose (yaw, pitch, roll) from MediaPipe")
    extra.add_argument("--local-image", action="store_true", help="EmojiDiff's local expression image (local.jpg)")
    extra.add_argument("--clip-vision", help="CLIPVisionModelWithProjection folder: clip_image of the local image")
    extra.add_argument("--emonet", help="EmoNet checkpoint (emonet_8.pth): emotion (valence, arousal, 8 probabilities)")
    extra.add_argument("--face-mask", action="store_true", help="face_mask: the filled MediaPipe face oval")
    extra.add_argument("--mask-size", type=int, default=64, help="face_mask side in cells (default 64)")
    extra.add_argument("--face-parser", choices=("oval", "bisenet", "parsenet"), default="oval",
                       help="face_mask from MediaPipe's face oval (default) or a facexlib face-parsing network")
    extra.add_argument("--face-parsing-model", help="facexlib's parsing_bisenet.pth / parsing_parsenet.pth (or .safetensors)")
    extra.add_argument("--min-liqe", type=float, default=0.0,
                       help="EmojiDiff's cleaning: skip pictures whose LIQE score (1-5) is below this (default 0: off)")
    extra.add_argument("--liqe-weights", help="pyiqa's LIQE weights file for --min-liqe (and CLIP ViT-B-32.pt, see README)")
    # Under torchrun / accelerate launch, WORLD_SIZE and RANK give the split without flags.
    parser.add_argument("--num-processes", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="processes/machines splitting the shards (default: torchrun's WORLD_SIZE, else 1)")
    parser.add_argument("--process-index", type=int, default=int(os.environ.get("RANK", 0)),
                        help="this process's index (default: torchrun's RANK, else 0)")
    parser.add_argument("--workers", type=int, default=0, help="local worker processes (0: in this process)")
    parser.add_argument("--max-shards", type=int, default=0, help="stop after this many shards (resume later)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    option_names = set(Options.__dataclass_fields__)
    options = Options(**{k: v for k, v in vars(args).items() if k in option_names})
    report = run_prepare(args.inputs, options, args.num_processes, args.process_index, args.workers,
                         args.max_shards, progress=not args.no_progress)
    summary = {k: v for k, v in report.items() if k != "skipped_files"}
    print(json.dumps(summary, indent=1))
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
