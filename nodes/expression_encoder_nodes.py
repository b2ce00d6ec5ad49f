"""Nodes that read expressions from photos: MediaPipe landmarks and blendshapes, SMIRK's FLAME
expression, EmoNet's emotion; and the condition images built from landmarks (FaceCrafter's landmark
image, EmojiDiff's local image).

Model folders (registered in ``model_folders``): ``smirk`` (SMIRK_em1.pt), ``mediapipe``
(face_landmarker.task), ``emotion`` (emonet_8.pth). All maths lives in ``encoders``.
"""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..encoders.core_face_landmarks import as_landmarks
from ..encoders.emotion import EMONET_CROP_SCALE, load_emonet, predict_emotion
from ..encoders.face_crops import emojidiff_local_image
from ..encoders.face_landmarks import (
    FACE_LANDMARKER_FILE,
    FaceLandmarker,
    analyzer_face_boxes,
    face_landmarker_path,
)
from ..encoders.face_mesh import REGIONS
from ..encoders.landmark_image import PALETTES, render_landmark_image
from ..encoders.previews import landmarks_overlay
from ..encoders.smirk import SMIRK_CHECKPOINT_NAME, encode_expression, load_smirk_encoder
from ..hosts.comfyui.helper_models import HelperModel, helper_module
from .model_folders import model_choices, model_file
from .types import (
    ArkitBlendshapesType,
    EmoNetType,
    EmotionType,
    FaceAnalyzerType,
    FaceLandmarkerType,
    FaceLandmarksType,
    FlameExpressionType,
    SmirkModelType,
    landmarks_input,
)
from .validation import check_choices, check_numbers

CATEGORY = "expression_adapters"
SMIRK_SOURCE = "the SMIRK project's pretrained model (Google Drive link in https://github.com/georgeretsi/smirk's README)"
EMONET_FILE = "emonet_8.pth"
EMONET_SOURCE = "https://github.com/face-analysis/emonet (folder pretrained/; licence CC BY-NC-ND 4.0)"


class LoadSmirkEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadSmirkEncoder",
            display_name="Load SMIRK Encoder",
            category=f"{CATEGORY}/loaders",
            description="Loads SMIRK's expression encoder (FLAME expression, eyelids, jaw) from SMIRK_em1.pt in "
                        "ComfyUI/models/smirk. Only the expression encoder of the file is used.",
            inputs=[io.Combo.Input("model_name", options=model_choices("smirk", SMIRK_CHECKPOINT_NAME),
                                   tooltip="File in ComfyUI/models/smirk (SMIRK_em1.pt as published)")],
            outputs=[SmirkModelType.Output(display_name="smirk_model")],
        )

    @classmethod
    def execute(cls, model_name):
        check_choices(cls, model_name=model_name)
        path = model_file("smirk", model_name, SMIRK_SOURCE)
        return io.NodeOutput(HelperModel(load_smirk_encoder(path, device="cpu"), "SMIRK"))


class LoadFaceLandmarker(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadFaceLandmarker",
            display_name="Load MediaPipe Face Landmarker",
            category=f"{CATEGORY}/loaders",
            description="MediaPipe's FaceLandmarker (Tasks API) from face_landmarker.task in ComfyUI/models/mediapipe: "
                        "478 landmarks with irises and 52 ARKit-style blendshapes per face. Runs on the CPU.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices("mediapipe", FACE_LANDMARKER_FILE),
                               tooltip="File in ComfyUI/models/mediapipe (face_landmarker.task)"),
                io.Int.Input("max_faces", default=4, min=1, max=20,
                             tooltip="Faces looked for per image; face_index of the nodes using this must be below it"),
                io.Float.Input("min_confidence", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="Minimum face detection, presence and tracking confidence"),
            ],
            outputs=[FaceLandmarkerType.Output(display_name="face_landmarker")],
        )

    @classmethod
    def execute(cls, model_name, max_faces, min_confidence):
        check_numbers(cls, max_faces=max_faces, min_confidence=min_confidence)
        check_choices(cls, model_name=model_name)
        path = folder_paths.get_full_path("mediapipe", model_name)
        if path is None:  # the library's error names the folder, the file and the download URL
            path = face_landmarker_path(folder_paths.get_folder_paths("mediapipe")[0], model_name)
        return io.NodeOutput(FaceLandmarker(path, max_faces=max_faces, min_detection_confidence=min_confidence,
                                            min_presence_confidence=min_confidence,
                                            min_tracking_confidence=min_confidence))


class FaceLandmarksNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersFaceLandmarks",
            display_name="Face Landmarks (MediaPipe)",
            category=f"{CATEGORY}/expression/extract",
            description="MediaPipe face mesh (478 points) and ARKit blendshapes of one face per image. "
                        "MediaPipe's detector misses small faces (group photos): with a face analyzer connected, "
                        "such images are retried on a crop around the face it finds. An image without a face "
                        "stops with an error naming its batch index (or, for video, can reuse the previous "
                        "frame's face).",
            inputs=[
                io.Image.Input("image", tooltip="A photo or a batch (video frames)"),
                FaceLandmarkerType.Input("face_landmarker", tooltip="From Load MediaPipe Face Landmarker"),
                io.Int.Input("face_index", default=0, min=0, max=19,
                             tooltip="Which face: numbered by size, largest first, from 0"),
                io.Combo.Input("running_mode", options=["image", "video"], default="image",
                               tooltip="image: each image on its own; video: the batch is consecutive frames "
                                       "and MediaPipe tracks the face between them (steadier)"),
                io.Float.Input("fps", default=30.0, min=1.0, max=240.0, step=1.0,
                               tooltip="Frame rate of the batch in video mode (frame timestamps)"),
                io.Combo.Input("on_missing", options=["error", "previous"], default="error",
                               tooltip="A frame without a face: error, or reuse the nearest earlier frame with one"),
                FaceAnalyzerType.Input("face_analyzer", optional=True,
                                       tooltip="Load InsightFace's detector: where MediaPipe finds no face in the whole "
                                               "picture (small faces), retry on a crop around the face_index-th face "
                                               "it finds (largest first)"),
            ],
            outputs=[
                FaceLandmarksType.Output(display_name="landmarks"),
                ArkitBlendshapesType.Output(display_name="blendshapes"),
                io.Image.Output(display_name="preview", tooltip="The face contours and landmarks over each image"),
            ],
        )

    @classmethod
    def execute(cls, image, face_landmarker, face_index, running_mode, fps, on_missing, face_analyzer=None):
        check_numbers(cls, face_index=face_index, fps=fps)
        face_boxes = analyzer_face_boxes(face_analyzer) if face_analyzer is not None else None
        result = face_landmarker.detect(image, face_index=face_index, running_mode=running_mode, fps=fps,
                                        on_missing=on_missing, face_boxes=face_boxes)
        return io.NodeOutput(result.landmarks, result.blendshapes, landmarks_overlay(image, result.landmarks))


class SmirkExpression(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersSmirkExpression",
            display_name="SMIRK Expression",
            category=f"{CATEGORY}/expression/extract",
            description="FLAME expression (50 expression, 2 eyelid, 3 jaw parameters) of each face with SMIRK. "
                        "The face is cropped around its 478 MediaPipe landmarks: connect landmarks, or a face "
                        "landmarker to find them here.",
            inputs=[
                io.Image.Input("image", tooltip="A photo or a batch"),
                SmirkModelType.Input("smirk_model", tooltip="From Load SMIRK Encoder"),
                io.Combo.Input("channel_order", options=["RGB", "BGR"], default="RGB",
                               tooltip="RGB is what SMIRK was trained on; BGR reproduces the Arc2Face Expression "
                                       "Adapter demo, which fed OpenCV's BGR frames"),
                landmarks_input("landmarks", optional=True,
                                        tooltip="One row per image (or several rows for several faces of one "
                                                "photo); used instead of the face landmarker"),
                FaceLandmarkerType.Input("face_landmarker", optional=True,
                                         tooltip="Finds the landmarks when none are connected"),
                io.Int.Input("face_index", default=0, min=0, max=19,
                             tooltip="With the face landmarker: which face, largest first, from 0"),
            ],
            outputs=[
                FlameExpressionType.Output(display_name="expression"),
                io.Image.Output(display_name="crop", tooltip="SMIRK's 224x224 input crops (RGB)"),
            ],
        )

    @classmethod
    def execute(cls, image, smirk_model, channel_order, face_index, landmarks=None, face_landmarker=None):
        check_numbers(cls, face_index=face_index)
        if landmarks is None:
            if face_landmarker is None:
                raise ValueError("SMIRK Expression needs the face's landmarks: connect 'landmarks' (Face Landmarks) "
                                 "or a 'face_landmarker' (Load MediaPipe Face Landmarker)")
            landmarks = face_landmarker.detect(image, face_index=face_index).landmarks
        landmarks = as_landmarks(landmarks, face_index)
        expression, crops = encode_expression(helper_module(smirk_model), image, landmarks, channel_order=channel_order)
        return io.NodeOutput(expression, crops)


class LandmarkImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLandmarkImage",
            display_name="Landmark Image (FaceCrafter)",
            category=f"{CATEGORY}/expression/images",
            description="Draws the face contours (oval, brows, eyes, irises, nose, lips) on black, one colour per "
                        "region: FaceCrafter's landmark condition image (pose and expression).",
            inputs=[
                landmarks_input("landmarks", tooltip="From Face Landmarks: one row per image"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8,
                             tooltip="Width of the landmark image in pixels (the generated image's width)"),
                io.Int.Input("height", default=512, min=64, max=4096, step=8,
                             tooltip="Height of the landmark image in pixels (the generated image's height)"),
                io.Combo.Input("fit", options=["image", "face"], default="image",
                               tooltip="image: the canvas is the photo the landmarks came from (resized); "
                                       "face: the face centred, filling the canvas"),
                io.Float.Input("face_scale", default=1.6, min=1.0, max=4.0, step=0.05,
                               tooltip="With fit 'face': canvas side / face size"),
                io.Combo.Input("palette", options=list(PALETTES), default="regions",
                               tooltip="regions: a colour per region; mediapipe: MediaPipe's contour style"),
                io.Int.Input("thickness", default=0, min=0, max=16, tooltip="Line width in pixels; 0 = 2 px at 512"),
                io.String.Input("regions", default=", ".join(REGIONS),
                                tooltip=f"Regions to draw, comma-separated: {', '.join(REGIONS)}"),
                io.Boolean.Input("mesh", default=False, tooltip="Also draw the full triangle mesh in grey underneath"),
                io.Boolean.Input("points", default=False, tooltip="Also draw every landmark as a dot"),
            ],
            outputs=[io.Image.Output(display_name="landmark_image")],
        )

    @classmethod
    def execute(cls, landmarks, width, height, fit, face_scale, palette, thickness, regions, mesh, points):
        check_numbers(cls, width=width, height=height, face_scale=face_scale, thickness=thickness)
        chosen = [name.strip() for name in regions.split(",") if name.strip()]
        return io.NodeOutput(render_landmark_image(as_landmarks(landmarks), height, width, regions=chosen, palette=palette,
                                                   thickness=thickness or None, fit=fit, face_scale=face_scale,
                                                   mesh=mesh, points=points))


class EmojiDiffLocalImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersEmojiDiffLocalImage",
            display_name="EmojiDiff Local Image",
            category=f"{CATEGORY}/expression/images",
            description="EmojiDiff's expression reference: eyes with brows, nose and mouth kept, background and face "
                        "contour removed, cropped square for CLIP vision (then encode it with CLIP Vision Encode).",
            inputs=[
                io.Image.Input("image", tooltip="The photo the landmarks came from (one per landmarks row)"),
                landmarks_input("landmarks", tooltip="From Face Landmarks: one row per image"),
                io.Int.Input("size", default=224, min=32, max=1024, step=8, tooltip="Side of the crop (CLIP: 224)"),
                io.Combo.Input("mode", options=["parts", "inner_face"], default="parts",
                               tooltip="parts: each part on its own; inner_face: one region around them all"),
                io.Float.Input("dilation", default=0.04, min=0.0, max=0.3, step=0.01,
                               tooltip="Grow the kept parts by this fraction of the face size"),
                io.Float.Input("feather", default=0.0, min=0.0, max=0.2, step=0.01,
                               tooltip="Soften the mask edge by this fraction of the face size"),
                io.Float.Input("margin", default=1.2, min=1.0, max=3.0, step=0.05,
                               tooltip="Crop side / extent of the kept parts"),
                io.Float.Input("fill", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Grey level of what is removed: 0 black, 1 white"),
            ],
            outputs=[
                io.Image.Output(display_name="local_image"),
                io.Mask.Output(display_name="mask", tooltip="The kept parts in the crop"),
                io.Mask.Output(display_name="photo_mask", tooltip="The kept parts in the full photo"),
            ],
        )

    @classmethod
    def execute(cls, image, landmarks, size, mode, dilation, feather, margin, fill):
        check_numbers(cls, size=size, dilation=dilation, feather=feather, margin=margin, fill=fill)
        local = emojidiff_local_image(image, as_landmarks(landmarks), size=size, mode=mode, dilation=dilation, feather=feather,
                                      margin=margin, fill=fill)
        return io.NodeOutput(local.images, local.masks, local.full_masks)


class LoadEmoNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadEmoNet",
            display_name="Load EmoNet",
            category=f"{CATEGORY}/loaders",
            description="Loads EmoNet (valence, arousal and 8 expression classes) from emonet_8.pth in "
                        "ComfyUI/models/emotion. EmoNet's weights are CC BY-NC-ND 4.0 (non-commercial).",
            inputs=[io.Combo.Input("model_name", options=model_choices("emotion", EMONET_FILE),
                                   tooltip="File in ComfyUI/models/emotion (emonet_8.pth or emonet_5.pth)")],
            outputs=[EmoNetType.Output(display_name="emonet")],
        )

    @classmethod
    def execute(cls, model_name):
        check_choices(cls, model_name=model_name)
        path = model_file("emotion", model_name, EMONET_SOURCE)
        return io.NodeOutput(HelperModel(load_emonet(path, device="cpu"), "EmoNet"))


MIN_FACE_CROP = 32  # smaller than this, a picture taken as a face crop holds no face EmoNet can read


class EmotionFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersEmotionFromImage",
            display_name="Emotion from Image",
            category=f"{CATEGORY}/expression/extract",
            description="Valence, arousal and the 8 emotion class probabilities of each face, with EmoNet.",
            inputs=[
                io.Image.Input("image", tooltip="A photo or a batch"),
                EmoNetType.Input("emonet", tooltip="From Load EmoNet"),
                landmarks_input("landmarks", optional=True,
                                        tooltip="Crop around these landmarks; without them each image is taken "
                                                "as a face crop already"),
                io.Float.Input("crop_scale", default=EMONET_CROP_SCALE, min=1.0, max=3.0, step=0.05,
                               tooltip="Crop side / face size (with landmarks)"),
            ],
            outputs=[
                EmotionType.Output(display_name="emotion"),
                io.Image.Output(display_name="crop", tooltip="EmoNet's 256x256 input crops"),
            ],
        )

    @classmethod
    def execute(cls, image, emonet, crop_scale, landmarks=None):
        check_numbers(cls, crop_scale=crop_scale)
        height, width = image.shape[1:3]
        if landmarks is None and min(height, width) < MIN_FACE_CROP:
            raise ValueError(f"Emotion from Image: a {width}x{height} image is too small to be a face crop (at least "
                             f"{MIN_FACE_CROP} pixels a side; EmoNet reads 256x256 crops); connect landmarks to crop the "
                             "face from a photo")
        landmarks = None if landmarks is None else as_landmarks(landmarks)
        emotion, crops = predict_emotion(helper_module(emonet), image, landmarks, scale=crop_scale)
        return io.NodeOutput(emotion, crops)


class LandmarksOverlay(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLandmarksOverlay",
            display_name="Face Landmarks Overlay",
            category=f"{CATEGORY}/expression/previews",
            description="Draws the face contours and landmarks over the photos.",
            inputs=[
                io.Image.Input("image", tooltip="The photos the landmarks came from"),
                landmarks_input("landmarks", tooltip="One row per image, or several faces of one photo"),
                io.Combo.Input("palette", options=list(PALETTES), default="regions",
                               tooltip="regions: a colour per region; mediapipe: MediaPipe's contour style"),
                io.Boolean.Input("points", default=True, tooltip="Draw every landmark as a dot"),
                io.Int.Input("thickness", default=0, min=0, max=16, tooltip="Line width in pixels; 0 = automatic"),
            ],
            outputs=[io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, image, landmarks, palette, points, thickness):
        check_numbers(cls, thickness=thickness)
        return io.NodeOutput(landmarks_overlay(image, as_landmarks(landmarks), palette=palette, points=points,
                                               thickness=thickness or None))


NODES = [LoadSmirkEncoder, LoadFaceLandmarker, LoadEmoNet, FaceLandmarksNode, SmirkExpression, EmotionFromImage,
         LandmarkImage, EmojiDiffLocalImage, LandmarksOverlay]
