"""The custom socket types our nodes exchange (V3 ``io.Custom``)."""

from comfy_api.latest import io

ExpressionAdapterType = io.Custom("EXPRESSION_ADAPTER")
FlameExpressionType = io.Custom("FLAME_EXPRESSION")
# The Reference Adapter LoRA: an ``adapters.lora.ReferenceLora``.
ReferenceAdapterType = io.Custom("REFERENCE_ADAPTER")

# The EmojiDiff E-Adapter: an ``adapters.e_adapter.EAdapter`` (ID and expression branches, optional FaceID LoRA).
EAdapterType = io.Custom("E_ADAPTER")

# Face detection + ArcFace recognition: an ``encoders.identity.FaceAnalyzer``. Not named INSIGHTFACE:
# IPAdapter Plus, InstantID, PuLID and PhotoMaker packs use that name for insightface's FaceAnalysis
# app, a different object, and ComfyUI would let the two be wired together.
FaceAnalyzerType = io.Custom("FACE_ANALYZER")
# ArcFace identity embeddings: a float32 CPU tensor B x 512, each row L2-normalised; one row per
# image of the batch, or a single row when the photos were averaged into one identity. Face Embed sets
# ``embeddings.recognizer`` to the recogniser's file name (``arcface.onnx``, ``w600k_r50.onnx`` ...):
# each recogniser has its own embedding space, and consumers refuse the wrong one.
ArcFaceEmbeddingType = io.Custom("ARCFACE_EMBEDDING")
# Arc2Face's ID text encoder: a ``nodes.identity_nodes.Arc2FaceIDEncoderModel``.
Arc2FaceIDEncoderType = io.Custom("ARC2FACE_ID_ENCODER")

# Expression values (``encoders.expressions``), each a batch with one row per image or frame:
# FLAME_EXPRESSION above (B x 55); MediaPipe's 52 ARKit blendshape scores (B x 52); MediaPipe face
# mesh landmarks (B x 478 x 3, normalised to the image); emotion (B x 10: valence, arousal, 8 classes).
ArkitBlendshapesType = io.Custom("ARKIT_BLENDSHAPES")
FaceLandmarksType = io.Custom("FACE_LANDMARKS")
EmotionType = io.Custom("EMOTION")
# Expression encoders: ``encoders.smirk.SmirkExpressionEncoder``, ``encoders.face_landmarks.FaceLandmarker``
# (MediaPipe Tasks), ``encoders.emotion.EmoNet``.
SmirkModelType = io.Custom("SMIRK_MODEL")
FaceLandmarkerType = io.Custom("FACE_LANDMARKER")
EmoNetType = io.Custom("EMONET")
# FaceCrafter's LMK/EMO control modules: an ``adapters.facecrafter.FaceCrafter``.
FaceCrafterType = io.Custom("FACECRAFTER")
