"""The custom socket types our nodes exchange (V3 ``io.Custom``).

Every name starts with ``EXPR_``: ComfyUI links any two sockets whose type names match, so a name that
core or another pack also uses (core's MediaPipe nodes have ``FACE_LANDMARKS``) would let users wire
two different objects together, and both sides fail at run time. The README lists the names.
"""

from comfy_api.latest import io

ExpressionAdapterType = io.Custom("EXPR_EXPRESSION_ADAPTER")
FlameExpressionType = io.Custom("EXPR_FLAME_EXPRESSION")
# The Reference Adapter LoRA: an ``adapters.lora.ReferenceLora``.
ReferenceAdapterType = io.Custom("EXPR_REFERENCE_ADAPTER")

# The EmojiDiff E-Adapter: an ``adapters.e_adapter.EAdapter`` (ID and expression branches, optional FaceID LoRA).
EAdapterType = io.Custom("EXPR_E_ADAPTER")

# Face detection + ArcFace recognition: an ``encoders.identity.FaceAnalyzer``. Not named INSIGHTFACE:
# IPAdapter Plus, InstantID, PuLID and PhotoMaker packs use that name for insightface's FaceAnalysis
# app, a different object, and ComfyUI would let the two be wired together.
FaceAnalyzerType = io.Custom("EXPR_FACE_ANALYZER")
# ArcFace identity embeddings: a float32 CPU tensor B x 512, each row L2-normalised; one row per
# image of the batch, or a single row when the photos were averaged into one identity. Face Embed sets
# ``embeddings.recognizer`` to the recogniser's file name (``arcface.onnx``, ``w600k_r50.onnx`` ...):
# each recogniser has its own embedding space, and consumers refuse the wrong one.
ArcFaceEmbeddingType = io.Custom("EXPR_ARCFACE_EMBEDDING")
# Arc2Face's ID text encoder: a ``nodes.identity_nodes.Arc2FaceIDEncoderModel``.
Arc2FaceIDEncoderType = io.Custom("EXPR_ARC2FACE_ID_ENCODER")

# Expression values (``encoders.expressions``), each a batch with one row per image or frame:
# FLAME_EXPRESSION above (B x 55); MediaPipe's 52 ARKit blendshape scores (B x 52); MediaPipe face
# mesh landmarks (B x 478 x 3, normalised to the image); emotion (B x 10: valence, arousal, 8 classes).
ArkitBlendshapesType = io.Custom("EXPR_ARKIT_BLENDSHAPES")
FaceLandmarksType = io.Custom("EXPR_FACE_LANDMARKS")
EmotionType = io.Custom("EXPR_EMOTION")
# Expression encoders: ``encoders.smirk.SmirkExpressionEncoder``, ``encoders.face_landmarks.FaceLandmarker``
# (MediaPipe Tasks), ``encoders.emotion.EmoNet``.
SmirkModelType = io.Custom("EXPR_SMIRK_MODEL")
FaceLandmarkerType = io.Custom("EXPR_FACE_LANDMARKER")
EmoNetType = io.Custom("EXPR_EMONET")
# FaceCrafter's LMK/EMO control modules: an ``adapters.facecrafter.FaceCrafter``.
FaceCrafterType = io.Custom("EXPR_FACECRAFTER")

# Core ComfyUI's own MediaPipe output (``comfy_extras/nodes_mediapipe.py``, ComfyUI 0.38+): a plain dict of
# per-frame faces, read by ``encoders.core_face_landmarks``. Our landmark and blendshape inputs accept it too.
CoreFaceLandmarksType = io.Custom("FACE_LANDMARKS")


def or_core_face_landmarks(socket: type, name: str, **options) -> io.MultiType.Input:
    """An input of ``socket``'s type that also takes core's ``FACE_LANDMARKS`` (``encoders.core_face_landmarks``)."""
    return io.MultiType.Input(name, types=[socket, CoreFaceLandmarksType], **options)


def landmarks_input(name: str, **options) -> io.MultiType.Input:
    """A landmarks input that takes ours or core's ``FACE_LANDMARKS`` (read with ``as_landmarks``)."""
    return or_core_face_landmarks(FaceLandmarksType, name, **options)
