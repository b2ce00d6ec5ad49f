"""Annotators for training.prepare: each adds fields to one sample, calling the encoders' real code.

Order: :class:`FaceAnnotator` finds the face, computes the ArcFace embedding and cuts the aligned
training crop; the others work on that crop (what the model is trained on):
:class:`LandmarkAnnotator` (MediaPipe 478 landmarks + 52 blendshapes, optional: needs
``face_landmarker.task``), :class:`SmirkAnnotator` (55 FLAME parameters), :class:`LatentAnnotator`
(VAE latent distribution, optional, so training need not run the VAE encoder every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class SkipSample(Exception):
    """The sample cannot be used (no face, ...); ``reason`` is counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Sample:
    """One image or video frame being annotated. ``image``: H x W x 3 uint8 RGB."""

    image: np.ndarray
    meta: dict
    crop: np.ndarray | None = None  # the aligned training crop, S x S x 3 uint8 RGB
    crop_box: np.ndarray | None = None  # face box (x0, y0, x1, y1) in crop pixels
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, np.ndarray] = field(default_factory=dict)  # extra RGB images: "local.jpg" -> H x W x 3 uint8


# --- alignment ------------------------------------------------------------------------------

def ffhq_quad(kps: np.ndarray) -> np.ndarray:
    """FFHQ's crop square (4 corners: top-left, bottom-left, bottom-right, top-right) from 5 keypoints.

    FFHQ (Karras et al., the alignment of its published script) places the square from the eye
    and mouth centres; insightface's 5 points (eyes, nose, mouth corners) give exactly those.
    Arc2Face and the Expression Adapter train on FFHQ-style aligned portraits.
    """
    kps = np.asarray(kps, dtype=np.float64)
    eye_left, eye_right, mouth_left, mouth_right = kps[0], kps[1], kps[3], kps[4]
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) * 0.5 - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    centre = eye_avg + eye_to_mouth * 0.1
    return np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])


def align_face(image: np.ndarray, kps: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The FFHQ-aligned ``size`` x ``size`` crop and the 2 x 3 source->crop matrix."""
    import cv2

    quad = ffhq_quad(kps).astype(np.float32)
    target = np.float32([[0, 0], [0, size], [size, size]])
    matrix = cv2.getAffineTransform(quad[:3], target)
    side = float(np.hypot(*(quad[3] - quad[0])))
    source = image
    if side > 2 * size:
        # Shrink first with area averaging: a direct warp of a much larger square aliases.
        factor = 2 * size / side
        source = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        matrix = matrix @ np.float32([[1 / factor, 0, 0], [0, 1 / factor, 0], [0, 0, 1]])
    crop = cv2.warpAffine(source, matrix.astype(np.float32), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)
    if source is not image:
        matrix = matrix @ np.float32([[factor, 0, 0], [0, factor, 0], [0, 0, 1]])
    return crop, matrix.astype(np.float32)


def transform_box(box: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Bounding box of a box's 4 corners under an affine map."""
    x0, y0, x1, y1 = box
    corners = np.float32([[x0, y0, 1], [x1, y0, 1], [x1, y1, 1], [x0, y1, 1]]) @ matrix.T
    return np.r_[corners.min(0), corners.max(0)].astype(np.float32)


# --- annotators -----------------------------------------------------------------------------

class FaceAnnotator:
    """insightface detection + ArcFace embedding (:class:`encoders.identity.FaceAnalyzer`), then the aligned crop.

    Fields: ``id`` (the L2-normalised embedding); metadata ``box``, ``kps``, ``det_score``,
    ``faces_found``. ``face_index`` 0 is the largest face, as in Arc2Face.
    """

    name = "face"

    def __init__(self, analyzer, resolution: int, face_index: int = 0):
        self.analyzer = analyzer
        self.resolution = int(resolution)
        self.face_index = int(face_index)

    def __call__(self, sample: Sample) -> None:
        from encoders.identity import FaceNotFoundError

        try:
            face = self.analyzer.analyze(sample.image, face_index=self.face_index)[0]
        except FaceNotFoundError as error:
            raise SkipSample("no_face", str(error)) from None
        crop, matrix = align_face(sample.image, face.kps, self.resolution)
        sample.crop = crop
        sample.crop_box = transform_box(face.box, matrix)
        sample.arrays["id"] = face.embedding.astype(np.float32)
        sample.meta.update(box=face.box.tolist(), kps=face.kps.tolist(), det_score=face.det_score,
                           faces_found=face.faces_found, crop_matrix=matrix.tolist())


class LandmarkAnnotator:
    """MediaPipe FaceLandmarker on the crop: ``landmarks`` (478 x 3, normalised to the crop) and ``blendshapes`` (52).

    With ``head_pose``: also ``head_pose`` (yaw, pitch, roll in degrees, from MediaPipe's facial
    transformation matrix; :func:`encoders.head_pose.head_pose_from_matrix`). The landmarks are
    all a FaceCrafter landmark image needs: training renders it on the fly
    (:func:`encoders.landmark_image.render_landmark_image`) at whatever size it trains.
    """

    name = "landmarks"

    def __init__(self, landmarker, head_pose: bool = False):
        self.landmarker = landmarker
        self.head_pose = head_pose

    def __call__(self, sample: Sample) -> None:
        try:
            result = self.landmarker.detect(sample.crop[None], running_mode="image")
        except ValueError as error:  # MediaPipe found no face in the aligned crop
            raise SkipSample("no_landmarks", str(error)) from None
        sample.arrays["landmarks"] = result.landmarks.values[0].numpy()
        sample.arrays["blendshapes"] = result.blendshapes.values[0].numpy()
        if self.head_pose:
            from encoders.head_pose import head_pose_from_matrix

            sample.arrays["head_pose"] = head_pose_from_matrix(result.matrices[0].numpy()).astype(np.float32)


def needs_landmarks(sample: Sample, what: str) -> np.ndarray:
    if "landmarks" not in sample.arrays:
        raise ValueError(f"{what} needs MediaPipe landmarks: give prepare --landmarker")
    return sample.arrays["landmarks"]


class FaceIdAnnotator:
    """A second identity embedding, ``faceid``: another recogniser (IP-Adapter-FaceID's buffalo_l
    ``w600k_r50.onnx``, which EmojiDiff's ID branch reads) on the same detected face as ``id``."""

    name = "faceid"

    def __init__(self, analyzer):
        self.analyzer = analyzer  # an encoders.identity.FaceAnalyzer, detector not needed

    def __call__(self, sample: Sample) -> None:
        from encoders.identity import Detection

        detection = Detection(np.float32(sample.meta["box"]), np.float32(sample.meta["kps"]),
                              float(sample.meta.get("det_score", 1.0)))
        face = self.analyzer.analyze(sample.image, detections=[[detection]])[0]
        sample.arrays["faceid"] = face.embedding.astype(np.float32)


class LocalImageAnnotator:
    """EmojiDiff's local expression image of the crop (:func:`encoders.face_crops.emojidiff_local_image`),
    stored as ``local.jpg``, and with a CLIP vision model its ``clip_image`` embedding (``image_embeds``;
    the encoder is frozen in every stage, so it is computed once here)."""

    name = "local_image"

    def __init__(self, clip_vision=None, size: int = 224, device="cpu"):
        self.clip = clip_vision.to(device).eval().requires_grad_(False) if clip_vision is not None else None
        self.size, self.device = int(size), device

    @torch.no_grad()
    def __call__(self, sample: Sample) -> None:
        from encoders.expressions import Landmarks
        from encoders.face_crops import emojidiff_local_image

        points = needs_landmarks(sample, "the EmojiDiff local image")
        crop = torch.from_numpy(sample.crop.astype(np.float32) / 255.0)[None]
        local = emojidiff_local_image(crop, Landmarks(torch.from_numpy(points)[None]), size=self.size).images
        sample.files["local.jpg"] = (local[0].numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        if self.clip is not None:
            sample.arrays["clip_image"] = clip_image_embeds(self.clip, local, self.device)[0].cpu().numpy()


# OpenAI CLIP's pixel mean and std, which OpenCLIP ViT-H/14 (IP-Adapter's image encoder) shares.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_embeds(model, images: torch.Tensor, device="cpu") -> torch.Tensor:
    """``image_embeds`` of a transformers CLIPVisionModelWithProjection for B x H x W x 3 images in 0..1
    (resized to the model's input size, then CLIP's mean/std)."""
    import torch.nn.functional as F

    size = int(model.config.image_size)
    pixels = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic",
                           align_corners=False, antialias=True).clamp(0, 1)
    pixels = (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    dtype = next(model.parameters()).dtype
    return model(pixel_values=pixels.to(device, dtype)).image_embeds.float()


class EmotionAnnotator:
    """EmoNet's ``emotion`` of the crop: valence, arousal and the 8 class probabilities (10 values)."""

    name = "emotion"

    def __init__(self, model):
        self.model = model

    def __call__(self, sample: Sample) -> None:
        from encoders.emotion import predict_emotion
        from encoders.expressions import Landmarks

        landmarks = None
        if "landmarks" in sample.arrays:
            landmarks = Landmarks(torch.from_numpy(sample.arrays["landmarks"])[None])
        emotion, _ = predict_emotion(self.model, sample.crop[None], landmarks)
        sample.arrays["emotion"] = emotion.values[0].numpy().astype(np.float32)


def face_oval_mask(crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The filled MediaPipe face-oval polygon in crop pixels (H x W bool): FaceCrafter's face-parser stand-in."""
    import cv2

    from encoders.face_mesh import REGION_POLYLINES

    height, width = crop.shape[:2]
    oval = np.asarray(REGION_POLYLINES["face_oval"][0][:-1])
    points = np.round(landmarks[oval, :2] * [width, height]).astype(np.int32)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [points], 1)
    return mask.astype(bool)


class FaceMaskAnnotator:
    """``face_mask``: ``size`` x ``size`` uint8 (0/1) for the AD loss, whose token grids are at most 64 x 64 at 512.

    ``parser(crop, landmarks) -> H x W bool`` is pluggable (a BiSeNet/EHANet face parser, as the paper
    used, can replace the default face-oval polygon); a cell is 1 when most of it is face.
    """

    name = "face_mask"

    def __init__(self, parser=face_oval_mask, size: int = 64):
        self.parser, self.size = parser, int(size)

    def __call__(self, sample: Sample) -> None:
        import cv2

        points = needs_landmarks(sample, "the face-oval mask") if self.parser is face_oval_mask else sample.arrays.get("landmarks")
        full = np.asarray(self.parser(sample.crop, points), dtype=np.float32)
        small = cv2.resize(full, (self.size, self.size), interpolation=cv2.INTER_AREA)
        sample.arrays["face_mask"] = (small >= 0.5).astype(np.uint8)


class SmirkAnnotator:
    """SMIRK's 55 FLAME parameters of the crop (:func:`encoders.smirk.encode_expression`).

    With landmarks (MediaPipe) the crop is SMIRK's own (1.4 x the landmarks' box). Without them
    the detector's face box stands in for the landmarks' box; the numbers then differ somewhat
    from SMIRK's reference preprocessing, which the manifest records (``smirk_crop``).
    """

    name = "flame"

    def __init__(self, model, channel_order: str = "RGB"):
        self.model = model
        self.channel_order = channel_order

    def __call__(self, sample: Sample) -> None:
        from encoders.expressions import Landmarks
        from encoders.smirk import encode_expression

        image = torch.from_numpy(sample.crop.astype(np.float32) / 255.0)[None]
        if "landmarks" in sample.arrays:
            landmarks = Landmarks(torch.from_numpy(sample.arrays["landmarks"])[None])
            sample.meta["smirk_crop"] = "landmarks"
        else:
            landmarks = box_landmarks(sample.crop_box, sample.crop.shape[:2])
            sample.meta["smirk_crop"] = "detector_box"
        expression, _ = encode_expression(self.model, image, landmarks, channel_order=self.channel_order)
        sample.arrays["flame"] = expression.values[0].numpy()


def box_landmarks(box: np.ndarray, image_hw: tuple[int, int]):
    """A landmark row whose bounding box is ``box``: SMIRK's crop then squares that box."""
    from encoders.expressions import Landmarks

    height, width = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    points = torch.zeros(478, 3)
    points[:, 0], points[:, 1] = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    points[0, :2] = torch.tensor([x0 / width, y0 / height])
    points[1, :2] = torch.tensor([x1 / width, y1 / height])
    return Landmarks(points[None], image_size=(height, width))


class LatentAnnotator:
    """The VAE's latent distribution of the crop (mean and std, float16, before the scaling factor).

    Training draws ``mean + std * noise`` each time, as if it ran the encoder itself.
    """

    name = "latents"

    def __init__(self, vae, device="cpu"):
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.device, self.dtype = device, next(vae.parameters()).dtype

    @torch.no_grad()
    def __call__(self, sample: Sample) -> None:
        pixels = torch.from_numpy(sample.crop).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        sample.arrays["latent_mean"] = dist.mean[0].float().cpu().numpy().astype(np.float16)
        sample.arrays["latent_std"] = dist.std[0].float().cpu().numpy().astype(np.float16)
