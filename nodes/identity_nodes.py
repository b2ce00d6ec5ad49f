"""Nodes for the Arc2Face ID path: load insightface, embed faces with ArcFace, Arc2Face ID conditioning.

Model folders (registered in ``model_folders``, so ``extra_model_paths.yaml`` can add more):
- ``insightface/models/antelopev2``: ``scrfd_10g_bnkps.onnx`` (antelopev2's detector) and
  ``arcface.onnx`` (Arc2Face's recogniser; antelopev2's ``glintr100.onnx`` is the fallback).
- ``arc2face/<name>``: the ID encoder, a folder with ``config.json`` and ``pytorch_model.bin``
  (or ``model.safetensors``); the published one goes in ``arc2face/encoder``.
The Arc2Face UNet itself is an ordinary SD1.5 UNet: ComfyUI's core ``UNETLoader`` (Load Diffusion
Model) loads ``diffusion_models/arc2face/diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import comfy.model_management as model_management
import comfy.sd1_clip
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..encoders.arc2face_id import WEIGHT_FILES, Arc2FaceIDEncoder
from ..encoders.downloads import FILE_GROUPS, MissingModelFiles, ensure_files
from ..encoders.identity import (
    DEFAULT_DET_SIZE,
    DEFAULT_OUTLIER_DISTANCE,
    DETECTOR_FILE,
    PROVIDER_CHOICES,
    FaceAnalyzer,
    embed_identity,
    find_model_files,
)
from .model_folders import check_name_inside
from .types import Arc2FaceIDEncoderType, ArcFaceEmbeddingType, FaceAnalyzerType
from .validation import check_choices, check_numbers

CATEGORY = "expression_adapters"
ANTELOPEV2 = ("models", "antelopev2")
DEFAULT_ENCODER = "encoder"
MAX_COSINE_DISTANCE = 2.0
logger = logging.getLogger(__name__)

# The published files each loader may fetch when asked (the detector is "manual": only inside a zip).
INSIGHTFACE_FILES = tuple(entry for group in FILE_GROUPS.values() for entry in group if entry.folder == "insightface")
ENCODER_FILES = tuple(entry for entry in FILE_GROUPS["arc2face"] if entry.folder == "arc2face")


def sd1_tokenizer_folder() -> str:
    """The SD1.5 CLIP tokenizer files ComfyUI ships (vocab.json, merges.txt)."""
    return os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer")


def antelopev2_folder() -> Path:
    """``<insightface folder>/models/antelopev2``: the first one holding the detector, else the first
    that exists, else the one in the first registered folder (normally ComfyUI/models/insightface)."""
    candidates = [Path(base, *ANTELOPEV2) for base in folder_paths.get_folder_paths("insightface")]
    for folder in candidates:
        if (folder / DETECTOR_FILE).is_file() or (folder / "antelopev2" / DETECTOR_FILE).is_file():
            return folder
    return next((folder for folder in candidates if folder.is_dir()), candidates[0])


def _download_insightface_files(folder: Path) -> None:
    # antelopev2.zip unzipped into antelopev2/ nests a folder of the same name; fetch next to the detector.
    nested = folder / "antelopev2"
    target = nested if not (folder / DETECTOR_FILE).is_file() and (nested / DETECTOR_FILE).is_file() else folder
    entries = [dataclasses.replace(entry, path=Path(entry.path).name) for entry in INSIGHTFACE_FILES]
    try:
        ensure_files(entries, target, download=True, folders={"insightface": target})
    except MissingModelFiles as error:
        try:
            find_model_files(folder)  # still usable (say, glintr100.onnx and the detector are there)?
        except FileNotFoundError:
            raise error from None
        logger.warning("Load InsightFace: %s\nGoing on with the recogniser already in %s.", error, target)


# Recognisers by "<pack>/<file>" under insightface/models: Arc2Face's and antelopev2's (Arc2Face, and the
# FaceCrafter ID path), and buffalo_l's w600k_r50 (IP-Adapter FaceID, so the EmojiDiff E-Adapter).
KNOWN_RECOGNIZERS = ("antelopev2/arcface.onnx", "antelopev2/glintr100.onnx", "buffalo_l/w600k_r50.onnx")
NOT_RECOGNIZERS = ("det_", "scrfd", "1k3d68", "2d106det", "genderage")
BUFFALO_L_DETECTOR = "det_10g.onnx"  # the same SCRFD-10GF detector as antelopev2's, in buffalo_l


def recognizer_choices() -> list[str]:
    """"auto", the known recognisers, and any other .onnx recogniser in a pack folder under insightface/models."""
    found = set()
    for base in folder_paths.get_folder_paths("insightface"):
        for path in Path(base, "models").glob("*/*.onnx"):
            if not path.name.startswith(NOT_RECOGNIZERS):
                found.add(f"{path.parent.name}/{path.name}")
    return ["auto", *KNOWN_RECOGNIZERS, *sorted(found - set(KNOWN_RECOGNIZERS))]


def recognizer_path(choice: str) -> Path:
    """The file of a "<pack>/<file>" choice in the first registered insightface folder that has it."""
    check_name_inside(choice, "Load InsightFace: recognizer")
    candidates = [Path(base, "models", *choice.split("/")) for base in folder_paths.get_folder_paths("insightface")]
    for path in candidates:
        if path.is_file():
            return path
    source = {"buffalo_l/w600k_r50.onnx": "insightface's buffalo_l pack "
                                          "(https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip)",
              "antelopev2/glintr100.onnx": "insightface's antelopev2 pack"}.get(choice, "the pack it belongs to")
    raise FileNotFoundError(f"recogniser {choice} not found (looked for {', '.join(map(str, candidates))}); get it from "
                            f"{source} and unzip it into insightface/models/{choice.split('/')[0]}")


def _detector_for(folder: Path, recognizer: Path) -> Path:
    """antelopev2's detector when present, else buffalo_l's identical det_10g.onnx beside a buffalo_l recogniser."""
    try:
        return find_model_files(folder, str(recognizer))[0]
    except FileNotFoundError:
        beside = recognizer.parent / BUFFALO_L_DETECTOR
        if beside.is_file():
            return beside
        raise


class LoadInsightFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadInsightFace",
            display_name="Load InsightFace",
            category=f"{CATEGORY}/loaders",
            description="Loads face detection (antelopev2's SCRFD) and ArcFace recognition (Arc2Face's arcface.onnx, "
                        "else antelopev2's glintr100.onnx) from ComfyUI/models/insightface/models/antelopev2.",
            inputs=[
                io.Combo.Input("provider", options=list(PROVIDER_CHOICES), default="auto",
                               tooltip="onnxruntime execution provider: auto = CUDA when onnxruntime-gpu has it, else CPU"),
                io.Int.Input("det_size", default=DEFAULT_DET_SIZE, min=160, max=2048, step=32,
                             tooltip="Detection resolution (square, multiple of 32). Larger finds smaller faces, more slowly"),
                io.Boolean.Input("download_missing", default=False,
                                 tooltip="Download arcface.onnx from hub FoivosPar/Arc2Face (HF_ENDPOINT is honoured) if it "
                                         "is missing. The detector only comes inside antelopev2.zip: the error says where to put it"),
                io.Combo.Input("recognizer", options=recognizer_choices(), default="auto", optional=True,
                               tooltip="ArcFace recogniser, under insightface/models. auto: antelopev2/arcface.onnx, else "
                                       "glintr100.onnx (Arc2Face). buffalo_l/w600k_r50.onnx: for the EmojiDiff E-Adapter "
                                       "(IP-Adapter FaceID). Each recogniser has its own embedding space"),
            ],
            outputs=[FaceAnalyzerType.Output(display_name="face_analyzer")],
        )

    @classmethod
    def execute(cls, provider, det_size, download_missing, recognizer="auto"):
        check_numbers(cls, det_size=det_size)
        check_choices(cls, provider=provider, recognizer=recognizer)
        folder = antelopev2_folder()
        if download_missing:
            _download_insightface_files(folder)
        if recognizer != "auto":
            path = recognizer_path(recognizer)
            analyzer = FaceAnalyzer(path, _detector_for(folder, path), det_size=det_size, provider=provider)
            logger.info("Load InsightFace: %r", analyzer)
            return io.NodeOutput(analyzer)
        try:
            analyzer = FaceAnalyzer.from_folder(folder, det_size=det_size, provider=provider)
        except FileNotFoundError as error:
            searched = ", ".join(str(Path(base, *ANTELOPEV2)) for base in folder_paths.get_folder_paths("insightface"))
            raise FileNotFoundError(
                f"{error} Folders searched: {searched}. Turn on download_missing to fetch arcface.onnx "
                "(the detector comes only inside antelopev2.zip)."
            ) from error
        if analyzer.recognizer_path.name != "arcface.onnx":
            logger.warning("Load InsightFace: using %s; Arc2Face was trained on embeddings from its own arcface.onnx",
                           analyzer.recognizer_path)
        logger.info("Load InsightFace: %r", analyzer)
        return io.NodeOutput(analyzer)


class FaceEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersFaceEmbed",
            display_name="Face Embed (ArcFace)",
            category=f"{CATEGORY}/identity",
            description="Finds a face in each photo, aligns it (5 keypoints, 112x112) and computes its ArcFace identity "
                        "embedding (512 numbers, L2-normalised). Several photos of one person can be averaged.",
            inputs=[
                FaceAnalyzerType.Input("face_analyzer", tooltip="From Load InsightFace: finds and recognises the face"),
                io.Image.Input("image", tooltip="One photo or a batch; grey, RGBA and 16-bit images are fine"),
                io.Int.Input("face_index", default=0, min=0, max=99,
                             tooltip="Which face of each photo: faces are numbered by box area, largest first, from 0"),
                io.Boolean.Input("average", default=False,
                                 tooltip="Average the photos of the batch into one identity (one embedding row) "
                                         "instead of one row per photo"),
                io.Float.Input("outlier_distance", default=DEFAULT_OUTLIER_DISTANCE, min=0.0, max=MAX_COSINE_DISTANCE,
                               step=0.01,
                               tooltip="When averaging 3 or more photos, leave out those farther than this cosine distance "
                                       "from the mean identity (another person, a bad detection). 2 keeps every photo"),
            ],
            outputs=[
                ArcFaceEmbeddingType.Output(display_name="embeddings"),
                io.Image.Output(display_name="aligned_faces", tooltip="The aligned 112x112 crops, one per photo"),
            ],
        )

    @classmethod
    def execute(cls, face_analyzer, image, face_index, average, outlier_distance):
        check_numbers(cls, face_index=face_index, outlier_distance=outlier_distance)
        threshold = None if outlier_distance >= MAX_COSINE_DISTANCE else float(outlier_distance)
        batch = embed_identity(face_analyzer, image, face_index=face_index, average=average, outlier_distance=threshold)
        for face in batch.faces:
            logger.info("Face Embed: image %d: face %d of %d, box %s, score %.3f", face.image_index + 1, face.face_index,
                        face.faces_found, [round(float(v)) for v in face.box], face.det_score)
        if batch.average is not None and batch.average.rejected:
            logger.warning("Face Embed: left out images %s of the average (cosine distances to the mean %s > %s)",
                           [i + 1 for i in batch.average.rejected],
                           [round(float(batch.average.distances[i]), 3) for i in batch.average.rejected], threshold)
        embeddings = batch.embeddings.detach().to("cpu", torch.float32).contiguous()
        embeddings.recognizer = face_analyzer.recognizer_path.name  # consumers refuse another recogniser's space
        return io.NodeOutput(embeddings, batch.crops)


def encoder_folder_names() -> list[str]:
    """Folders under the registered ``arc2face`` folders (up to 3 levels) holding config.json and weights."""
    names = set()
    for base in folder_paths.get_folder_paths("arc2face"):
        if not os.path.isdir(base):
            continue
        for path, folders, files in os.walk(base, followlinks=True):
            relative = os.path.relpath(path, base)
            if relative.count(os.sep) >= 2:
                folders.clear()
            if relative != "." and "config.json" in files and any(name in files for name in WEIGHT_FILES):
                names.add(Path(relative).as_posix())
    return sorted(names)


def encoder_folder(name: str) -> Path:
    """``<arc2face folder>/<name>``: the first that has config.json, else the first that exists, else the first."""
    check_name_inside(name, "Load Arc2Face ID Encoder: encoder_name")
    candidates = [Path(base, name) for base in folder_paths.get_folder_paths("arc2face")]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    return next((folder for folder in candidates if folder.is_dir()), candidates[0])


def _missing_encoder_files(folder: Path) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(reversed(WEIGHT_FILES)))
    return missing


def id_encoder_dtype(load_device) -> torch.dtype:
    """ComfyUI's text-encoder dtype policy: ``--fp16-text-enc``, ``--bf16-text-enc`` and ``--fp32-text-enc`` are
    honoured; without a flag, float16 on GPUs and float32 on the CPU.

    Our choice where ComfyUI differs: ComfyUI's own text encoders default to float16 on the CPU too, because
    its ops cast each layer up to float32 there; the transformers encoder here computes in its stored dtype, so
    it keeps float32 on the CPU. fp8 storage (``--fp8-*-text-enc``) needs ComfyUI's casting ops: float16 is used.
    """
    args = model_management.args
    explicit = args.fp16_text_enc or args.bf16_text_enc or args.fp32_text_enc
    if model_management.is_device_cpu(load_device) and not explicit:
        return torch.float32
    dtype = model_management.text_encoder_dtype(load_device)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        logger.warning("Arc2Face ID encoder: fp8 text-encoder storage is not supported; using float16")
        return torch.float16
    return dtype


class Arc2FaceIDEncoderModel:
    """What the ARC2FACE_ID_ENCODER socket carries: the library's :class:`Arc2FaceIDEncoder`, its text model in a
    ComfyUI ``ModelPatcher`` (text-encoder load and offload devices), loaded by ComfyUI's model management
    for each encode, as ComfyUI's own text encoders are."""

    def __init__(self, encoder: Arc2FaceIDEncoder, folder: Path, load_device, offload_device):
        self.encoder = encoder
        self.folder = folder
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        # a plain container: ModelPatcher sets attributes (``device``) that transformers models do not allow
        holder = torch.nn.ModuleDict({"text_model": encoder.text_model.to(self.offload_device)})
        self.patcher = ModelPatcher(holder, load_device=self.load_device, offload_device=self.offload_device)

    def __repr__(self) -> str:
        dtype = next(self.encoder.text_model.parameters()).dtype
        return f"Arc2FaceIDEncoderModel({self.folder}, {dtype}, load={self.load_device}, offload={self.offload_device})"

    def encode(self, embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive (B x 77 x D, one row per embedding) and negative (the empty prompt, as many rows), float32."""
        model_management.load_models_gpu([self.patcher])
        positive = self.encoder.encode(embeddings)
        negative = self.encoder.encode_negative(positive.shape[0])
        device = model_management.intermediate_device()
        return positive.to(device), negative.to(device)


class LoadArc2FaceIDEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        found = encoder_folder_names()
        # the published folder name always, so that choosing it gives the error that says what to put there
        names = [DEFAULT_ENCODER, *(name for name in found if name != DEFAULT_ENCODER)]
        default = DEFAULT_ENCODER if DEFAULT_ENCODER in found or len(names) == 1 else names[1]
        return io.Schema(
            node_id="ExpressionAdaptersLoadArc2FaceIDEncoder",
            display_name="Load Arc2Face ID Encoder",
            category=f"{CATEGORY}/loaders",
            description="Loads Arc2Face's ID encoder (a fine-tuned CLIP text encoder) from a folder in ComfyUI/models/arc2face "
                        "with config.json and pytorch_model.bin, as published in hub repo FoivosPar/Arc2Face (encoder/). "
                        "The tokenizer is ComfyUI's own SD1 tokenizer.",
            inputs=[
                io.Combo.Input("encoder_name", options=names, default=default,
                               tooltip="Folder in ComfyUI/models/arc2face holding config.json and pytorch_model.bin "
                                       "(or model.safetensors)"),
                io.Boolean.Input("download_missing", default=False,
                                 tooltip="Download encoder/config.json and encoder/pytorch_model.bin (about 500 MB) from hub "
                                         "FoivosPar/Arc2Face into that folder if they are missing (HF_ENDPOINT is honoured)"),
            ],
            outputs=[Arc2FaceIDEncoderType.Output(display_name="id_encoder")],
        )

    @classmethod
    def execute(cls, encoder_name, download_missing):
        check_choices(cls, encoder_name=encoder_name)
        folder = encoder_folder(encoder_name)
        missing = _missing_encoder_files(folder)
        if missing and download_missing:
            entries = [dataclasses.replace(entry, path=Path(entry.path).name) for entry in ENCODER_FILES]
            ensure_files(entries, folder, download=True, folders={"arc2face": folder})
        elif missing:
            searched = ", ".join(folder_paths.get_folder_paths("arc2face"))
            raise FileNotFoundError(
                f"Arc2Face ID encoder folder {folder} is missing {' and '.join(missing)}: it must hold config.json and "
                f"pytorch_model.bin (or model.safetensors), the encoder/ folder of hub repo FoivosPar/Arc2Face "
                f"(arc2face folders searched: {searched}). Put the files there, or turn on download_missing."
            )
        load_device = model_management.text_encoder_device()
        offload_device = model_management.text_encoder_offload_device()
        encoder = Arc2FaceIDEncoder.from_folders(folder, sd1_tokenizer_folder(), dtype=id_encoder_dtype(load_device),
                                                 device=offload_device)
        model = Arc2FaceIDEncoderModel(encoder, folder, load_device, offload_device)
        logger.info("Load Arc2Face ID Encoder: %r", model)
        return io.NodeOutput(model)


class Arc2FaceIDConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersArc2FaceIDConditioning",
            display_name="Arc2Face ID Conditioning",
            category=f"{CATEGORY}/identity",
            description="Turns ArcFace embeddings into Arc2Face conditioning: the prompt \"photo of a id person\" with the "
                        "identity in place of the id token (positive), and the empty prompt (negative). For KSampler or "
                        "SamplerCustom with the Arc2Face UNet; Arc2Face's defaults are DPM++ 2M, 25 steps, CFG 3, 512x512.",
            inputs=[
                Arc2FaceIDEncoderType.Input("id_encoder", tooltip="From Load Arc2Face ID Encoder"),
                ArcFaceEmbeddingType.Input("embeddings", tooltip="One row per image of the latent batch, or one row for all"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, id_encoder, embeddings):
        made_by = getattr(embeddings, "recognizer", None)
        if made_by not in (None, "arcface.onnx", "glintr100.onnx"):
            logger.warning("Arc2Face ID Conditioning: the embedding comes from %s; Arc2Face was trained on arcface.onnx "
                           "embeddings (set recognizer to auto or antelopev2/arcface.onnx in Load InsightFace)", made_by)
        positive, negative = id_encoder.encode(embeddings)
        return io.NodeOutput([[positive, {}]], [[negative, {}]])


NODES = [LoadInsightFace, FaceEmbed, LoadArc2FaceIDEncoder, Arc2FaceIDConditioning]
