"""Nodes for the EmojiDiff E-Adapter: load it, apply it, and score expression transfer (Exp, LMS).

Files: our E-Adapter (``models/expression_adapters``); or the published IP-Adapter files it is
assembled from (``models/ipadapter``: ``ip-adapter-faceid_sd15.bin`` + ``ip-adapter_sd15.bin``, or
``ip-adapter-faceid_sdxl.bin`` + ``ip-adapter_sdxl_vit-h.bin``); the FaceID LoRA inside the FaceID
``.bin``, or its separate ``*_lora.safetensors`` in ``models/loras``.
"""

from __future__ import annotations

import logging
import math

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..adapters.branches import TokenCondition
from ..adapters.checkpoints import E_ADAPTER_FILE, adapter_file_kind
from ..adapters.e_adapter import EAdapter
from ..adapters.layers import LAYER_SETS
from ..encoders.core_face_landmarks import read_core_face_landmarks, read_each
from ..encoders.expression_metrics import expression_scores
from ..encoders.previews import score_table
from ..hosts.comfyui.e_adapter import install_e_adapter
from .types import ArcFaceEmbeddingType, CoreFaceLandmarksType, EAdapterType, FaceLandmarkerType
from .validation import check_choices, check_numbers

CATEGORY = "expression_adapters"
EXPRESSION_LAYER_CHOICES = ["auto", *LAYER_SETS]
SOURCES = ("e_adapter_file", "ip_adapter_files")
NONE = "none"
logger = logging.getLogger(__name__)


def file_choices(folder: str, kind: str | None = None) -> list[str]:
    """``none`` and the folder's files (of our ``kind`` only, when given: see ``adapter_file_kind``)."""
    names = folder_paths.get_filename_list(folder)
    if kind is not None:
        names = [name for name in names if adapter_file_kind(folder_paths.get_full_path(folder, name) or name) == kind]
    return [NONE, *names]


def _full_path(folder: str, name: str, what: str) -> str:
    if name == NONE:
        raise ValueError(f"Load E-Adapter: choose the {what} (a file in ComfyUI/models/{folder})")
    return folder_paths.get_full_path_or_raise(folder, name)


class LoadEAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadEAdapter",
            display_name="Load E-Adapter (EmojiDiff)",
            category=f"{CATEGORY}/loaders",
            description="Loads an EmojiDiff E-Adapter: our .safetensors (ID + expression branches) from "
                        "ComfyUI/models/expression_adapters, or assembled from the published IP-Adapter files in "
                        "ComfyUI/models/ipadapter (FaceID + image adapter: EmojiDiff's starting point, untrained for "
                        "expression transfer).",
            inputs=[
                io.Combo.Input("source", options=list(SOURCES), default="e_adapter_file",
                               tooltip="e_adapter_file: our trained file; ip_adapter_files: FaceID + image IP-Adapter files"),
                io.Combo.Input("e_adapter_name", options=file_choices("expression_adapters", E_ADAPTER_FILE),
                               tooltip="Our E-Adapter .safetensors in ComfyUI/models/expression_adapters (source e_adapter_file)"),
                io.Combo.Input("faceid_name", options=file_choices("ipadapter"),
                               tooltip="ip-adapter-faceid_sd15.bin or ip-adapter-faceid_sdxl.bin (h94/IP-Adapter-FaceID) "
                                       "in ComfyUI/models/ipadapter; its LoRA is split off and applied by Apply E-Adapter"),
                io.Combo.Input("image_name", options=file_choices("ipadapter"),
                               tooltip="ip-adapter_sd15.bin or ip-adapter_sdxl_vit-h.bin (h94/IP-Adapter, ViT-H) in "
                                       "ComfyUI/models/ipadapter: the expression branch"),
                io.Combo.Input("lora_name", options=file_choices("loras"), default=NONE,
                               tooltip="Optional: the FaceID LoRA as a separate file (ip-adapter-faceid_sd15_lora.safetensors) "
                                       "in ComfyUI/models/loras; it replaces a LoRA found inside the FaceID .bin"),
            ],
            outputs=[EAdapterType.Output(display_name="e_adapter")],
        )

    @classmethod
    def execute(cls, source, e_adapter_name, faceid_name, image_name, lora_name=NONE):
        check_choices(cls, {"e_adapter_name": "expression_adapters"}, source=source, e_adapter_name=e_adapter_name,
                      faceid_name=faceid_name, image_name=image_name, lora_name=lora_name)
        if source == "e_adapter_file":
            adapter = EAdapter.from_file(_full_path("expression_adapters", e_adapter_name, "E-Adapter file"))
        else:
            adapter = EAdapter.from_published(_full_path("ipadapter", faceid_name, "FaceID IP-Adapter file"),
                                              _full_path("ipadapter", image_name, "image IP-Adapter file"))
        if lora_name != NONE:
            adapter.lora_file = folder_paths.get_full_path_or_raise("loras", lora_name)
        logger.info("Load E-Adapter: %s, expression layers %s, CLIP %s, ID recogniser %s, FaceID LoRA %s",
                    adapter.layout.name, adapter.expression_layers, adapter.clip_vision, adapter.id_recognizer,
                    adapter.lora_file or (f"{len(adapter.lora)} modules from the FaceID file" if adapter.lora else "none"))
        return io.NodeOutput(adapter.compact_branches().eval())


RECOGNIZER_ATTRIBUTE = "recognizer"  # set on ARCFACE_EMBEDDING tensors by Face Embed


def check_recognizer(adapter: EAdapter, embeddings: torch.Tensor) -> None:
    """Refuse identity embeddings from another recogniser: each ArcFace model has its own embedding space."""
    made_by = getattr(embeddings, RECOGNIZER_ATTRIBUTE, None)
    if made_by is not None and made_by != adapter.id_recognizer:
        raise ValueError(
            f"the identity embedding was made by {made_by}, but the E-Adapter's ID branch (IP-Adapter FaceID) was "
            f"trained on {adapter.id_recognizer} embeddings, a different embedding space: in Load InsightFace set "
            f"recognizer to buffalo_l/{adapter.id_recognizer} (insightface's buffalo_l pack) and run Face Embed again")


def e_adapter_conditions(adapter: EAdapter, id_embeddings: torch.Tensor | None = None,
                         image_embeds: torch.Tensor | None = None, id_strength: float = 1.0,
                         expression_strength: float = 1.0, expression_layers: str = "auto") -> dict[str, TokenCondition]:
    """The E-Adapter's branch conditions, their tokens computed once, before anything is patched: the ID branch's
    from the identity embedding, the expression branch's (on ``expression_layers``) from the CLIP vision
    ``image_embeds``; either may be left out."""
    if id_embeddings is None and image_embeds is None:
        raise ValueError("Apply E-Adapter needs an identity embedding, a CLIP vision output of the expression photo, or both")
    conditions = {}
    with torch.no_grad():
        if id_embeddings is not None:
            check_recognizer(adapter, id_embeddings)
            conditions["identity embedding"] = TokenCondition(
                adapter.identity, adapter.id_tokens(id_embeddings), adapter.unconditional_id_tokens(), id_strength,
                "the identity embedding")
        if image_embeds is not None:
            conditions["expression image"] = TokenCondition(
                adapter.expression_branch(expression_layers), adapter.expression_tokens(image_embeds),
                adapter.unconditional_expression_tokens(), expression_strength, "the expression image")
    return conditions


def apply_e_adapter(model, adapter: EAdapter, id_embeddings: torch.Tensor | None = None,
                    image_embeds: torch.Tensor | None = None, id_strength: float = 1.0, expression_strength: float = 1.0,
                    expression_layers: str = "auto", start_at: float = 0.0, end_at: float = 1.0,
                    lora_strength: float = 1.0):
    """What Apply E-Adapter does: a clone of ``model`` with the E-Adapter's branches (tokens computed here) and
    its FaceID LoRA (the host's)."""
    conditions = e_adapter_conditions(adapter, id_embeddings, image_embeds, id_strength, expression_strength,
                                      expression_layers)
    return install_e_adapter(model, adapter, conditions, start_at, end_at, lora_strength)


class ApplyEAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersApplyEAdapter",
            display_name="Apply E-Adapter (EmojiDiff)",
            category=f"{CATEGORY}/apply",
            description="EmojiDiff: identity from one face (ArcFace, buffalo_l w600k_r50) and expression from another "
                        "(CLIP vision of the EmojiDiff Local Image), on any SD1.5 or SDXL model, with a text prompt. "
                        "Either condition may be left out. Stacks with IPAdapter, InstantID and our other adapters. "
                        "Suggested: SD1.5 CFG 7.5, 30 steps; SDXL CFG 5.0.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 or SDXL model (checkpoint loader, or after the FaceID LoRA), "
                                                "possibly already patched by other adapters"),
                EAdapterType.Input("e_adapter", tooltip="From Load E-Adapter"),
                ArcFaceEmbeddingType.Input("id_embedding", optional=True,
                                           tooltip="Face Embed output with Load InsightFace set to buffalo_l/w600k_r50.onnx; "
                                                   "one row for the whole batch, or one per image"),
                io.ClipVisionOutput.Input("expression_clip_vision", optional=True,
                                          tooltip="CLIP Vision Encode (ViT-H, crop none) of the EmojiDiff Local Image of the "
                                                  "expression photo; one image for the whole batch, or one per image"),
                io.Float.Input("id_strength", default=EAdapter.default_id_strength, min=0.0, max=3.0, step=0.05,
                               tooltip="lambda_id: weight of the identity branch (paper: 1)"),
                io.Float.Input("expression_strength", default=EAdapter.default_expression_strength, min=0.0, max=3.0,
                               step=0.05, tooltip="lambda_exp: weight of the expression branch (paper: 1)"),
                io.Combo.Input("expression_layers", options=EXPRESSION_LAYER_CHOICES, default="auto",
                               tooltip="Where the expression branch goes. auto: the adapter's own set (all 16 layers on "
                                       "SD1.5, up_blocks.0.attentions.1 on SDXL, as in the paper). Others need an adapter "
                                       "that holds those layers (one assembled from the IP-Adapter files holds all)"),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling where both branches start"),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling where both branches stop"),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Strength of the FaceID LoRA (FaceID was trained with it at 1.0); 0 leaves it off"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, e_adapter, id_strength, expression_strength, expression_layers, start_at, end_at,
                lora_strength, id_embedding=None, expression_clip_vision=None):
        check_numbers(cls, id_strength=id_strength, expression_strength=expression_strength, lora_strength=lora_strength)
        image_embeds = None
        if expression_clip_vision is not None:
            image_embeds = expression_clip_vision["image_embeds"]
            if image_embeds is None:
                raise ValueError("the CLIP vision output has no image_embeds: use a CLIP vision model with a projection "
                                 "(ViT-H/14 for the E-Adapter)")
        return io.NodeOutput(apply_e_adapter(model, e_adapter, id_embedding, image_embeds, id_strength, expression_strength,
                                             expression_layers, start_at, end_at, lora_strength=lora_strength))


SCORE_OUTPUTS = (0, 1, 2)  # exp_mean, exp_sum, lms: the FLOAT outputs


def scores_feed_other_nodes(hidden) -> bool:
    """Whether another node of the running prompt reads a score output; True when the prompt is unknown (a call
    from Python), so that no NaN can flow on unseen."""
    prompt, node_id = getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)
    if not isinstance(prompt, dict) or node_id is None:
        return True
    return any(isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id) and value[1] in SCORE_OUTPUTS
               for node in prompt.values() for value in node.get("inputs", {}).values())


def faces_of(images, core_faces, face_landmarker, face_index: int, name: str, each: bool = False):
    """The faces of ``images`` from core's FACE_LANDMARKS when given, else found by our face landmarker;
    ``each``: one result per image, None where it has no face."""
    if core_faces is None:
        if face_landmarker is None:
            raise ValueError(f"Expression Scores: connect a face_landmarker, or {name}_faces (core's Detect Face "
                             f"Landmarks on the {name} images)")
        return face_landmarker.detect_each(images, face_index) if each else face_landmarker.detect(images, face_index=face_index)
    results = read_each(core_faces, face_index) if each else read_core_face_landmarks(core_faces, face_index)
    frames = len(results) if each else len(results.landmarks)
    size = next((r.landmarks.image_size for r in results if r is not None), None) if each else results.landmarks.image_size
    if frames != images.shape[0] or size not in (None, tuple(images.shape[1:3])):
        raise ValueError(f"Expression Scores: {name}_faces were found on {frames} frames of {size}, the {name} images "
                         f"are {images.shape[0]} of {tuple(images.shape[1:3])} (height, width); detect on the same images")
    return results


class ExpressionScores(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersExpressionScores",
            display_name="Expression Scores (Exp, LMS)",
            category=f"{CATEGORY}/evaluate",
            description="EmojiDiff's expression metrics between a reference and generated faces (MediaPipe): Exp = "
                        "|blendshape differences| over the 52 blendshapes, as a mean and as a sum, and LMS = summed "
                        "differences of eye, pupil and mouth ratios. The paper writes Exp as a sum, but its numbers "
                        "(0.054 ...) and the 0.05 filter fit the mean. Lower is closer.",
            inputs=[
                io.Image.Input("reference", tooltip="The expression photo: one for all generated images, or one per image"),
                io.Image.Input("generated", tooltip="Generated images"),
                FaceLandmarkerType.Input("face_landmarker", optional=True,
                                         tooltip="From Load MediaPipe Face Landmarker: finds the blendshapes and "
                                                 "landmarks the scores compare (not needed where *_faces are given)"),
                io.Int.Input("face_index", default=0, min=0, max=19,
                             tooltip="Which face of each picture: numbered by size, largest first, from 0"),
                CoreFaceLandmarksType.Input("reference_faces", optional=True,
                                            tooltip="Core's Detect Face Landmarks (MediaPipe) on the reference, "
                                                    "instead of the face landmarker"),
                CoreFaceLandmarksType.Input("generated_faces", optional=True,
                                            tooltip="Core's Detect Face Landmarks (MediaPipe) on the generated images, "
                                                    "instead of the face landmarker"),
            ],
            outputs=[
                io.Float.Output(display_name="exp_mean", tooltip="Exp averaged over the images (mean over blendshapes)"),
                io.Float.Output(display_name="exp_sum", tooltip="Exp averaged over the images (sum over blendshapes)"),
                io.Float.Output(display_name="lms", tooltip="LMS averaged over the images"),
                io.String.Output(display_name="report", tooltip="Per-image and mean values as text"),
                io.Image.Output(display_name="table", tooltip="The same numbers as a small table image"),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # which outputs the prompt reads: see scores_feed_other_nodes
        )

    @classmethod
    def execute(cls, reference, generated, face_index, face_landmarker=None, reference_faces=None, generated_faces=None):
        count = generated.shape[0]
        if reference.shape[0] not in (1, count):
            raise ValueError(f"{reference.shape[0]} reference images for {count} generated images: give one reference, "
                             "or one per image")
        ref = faces_of(reference, reference_faces, face_landmarker, face_index, "reference")
        # a generated picture without a face (a failed generation) gets no score instead of stopping the run
        each = faces_of(generated, generated_faces, face_landmarker, face_index, "generated", each=True)
        found = {i: result for i, result in enumerate(each) if result is not None}
        if not found and scores_feed_other_nodes(cls.hidden):  # NaN would flow on: no other output of the pack gives NaN
            raise ValueError(f"Expression Scores: none of the {count} generated images shows a face (face_index "
                             f"{face_index}), so there is no score for the nodes its score outputs feed; look at the "
                             "pictures (the report and table still say which have no face when only they are used)")
        if len(found) < count:
            logger.warning("Expression Scores: no face found in generated images %s; they get no score",
                           [i + 1 for i in range(count) if i not in found])
        columns = ("exp_mean", "exp_sum", "lms")
        values = {column: np.full(count, np.nan) for column in columns}
        scored = sorted(found)
        if scored:
            ref_rows = slice(None) if reference.shape[0] == 1 else scored
            scores = expression_scores(ref.blendshapes.values.numpy()[ref_rows],
                                       np.concatenate([found[i].blendshapes.values.numpy() for i in scored]),
                                       ref.landmarks.values.numpy()[ref_rows],
                                       np.concatenate([found[i].landmarks.values.numpy() for i in scored]),
                                       tuple(reference.shape[1:3]), tuple(generated.shape[1:3]))
            for column in columns:
                values[column][scored] = scores[column]
        # no face anywhere: the score outputs feed nothing (checked above), only the report and table are read
        means = [float(values[column][scored].mean()) if scored else math.nan for column in columns]
        rows = [(f"image {i + 1}" + ("" if i in found else ": no face"), [float(values[c][i]) for c in columns])
                for i in range(count)]
        rows.append(("mean" if len(scored) == count else f"mean of {len(scored)} with a face", means))
        report = "\n".join(f"{label}: " + ", ".join(f"{c} {v:.4f}" for c, v in zip(columns, row)) for label, row in rows)
        return io.NodeOutput(*means, report, score_table(columns, rows))


NODES = [LoadEAdapter, ApplyEAdapter, ExpressionScores]
