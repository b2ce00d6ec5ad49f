"""Emotion for FaceCrafter: an EmoNet-compatible network (valence, arousal, 8 expression classes)
and manual emotion builders.

EmoNet (Toisoul et al., Nature Machine Intelligence 2021; published weights ``emonet_8.pth``,
``emonet_5.pth``) is re-written here; parameter names follow the published model definition as
this module assumes it:

- stem: ``conv1`` (Conv 3->64, 7x7, stride 2, bias), ``bn1``; ``conv2`` ConvBlock(64, 128),
  then max-pool 2; ``conv3`` ConvBlock(128, 128); ``conv4`` ConvBlock(128, 256);
- FAN stacking, for i in 0..num_modules-1 (2): ``m{i}`` HourGlass(depth 4, 256) with children
  ``b1_{level}``, ``b2_{level}``, ``b3_{level}`` (levels 4..1) and ``b2_plus_1``,
  downsampling by 2x2 max pooling and upsampling nearest; ``top_m_{i}``
  ConvBlock; ``conv_last{i}`` Conv 1x1; ``bn_end{i}``; ``l{i}`` Conv 1x1 -> 68 heatmaps; and for
  all but the last module ``bl{i}`` (Conv 256->256) and ``al{i}`` (Conv 68->256);
- ConvBlock(in, out): ``bn1, conv1`` (3x3 -> out/2), ``bn2, conv2`` (-> out/4), ``bn3, conv3``
  (-> out/4), outputs concatenated, plus the residual (``downsample`` = Sequential(BN, ReLU,
  Conv 1x1) when in != out); 3x3 convs have no bias;
- emotion head: ``conv1x1_input_emo_2`` (Conv 1x1, 256 * (num_modules + 1) -> 256) on the stem
  features concatenated with every module's features (multiplied by the summed heatmaps,
  "attention"); ``emo_net_2`` = Sequential of 4 x [ConvBlock(256, 256), MaxPool 2]; average
  pool 4; ``emo_fc_2`` = Sequential(Linear 256->128, BatchNorm1d, ReLU, Linear 128 -> n + 2).
- outputs: the first n numbers are the expression logits, then valence, then arousal.

Input: a 256 x 256 RGB face crop, values 0..1, no normalisation. Class order for 8 classes:
Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt (5-class models: the first five).

The published files were saved from ``nn.DataParallel``; a ``module.`` prefix is stripped.
All the network's parameters must be present (BatchNorm ``num_batches_tracked`` may be absent);
keys the network does not have are logged and ignored, as the official loader (``strict=False``) did.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .expressions import EMOTION_CLASSES, Emotion, Landmarks
from .face_crops import landmark_square_crop, to_image_batch
from .weight_files import assign_weights, fill_batchnorm_counters, read_checkpoint, without_init

logger = logging.getLogger(__name__)

EMONET_INPUT_SIZE = 256
EMONET_CROP_SCALE = 1.2


class ConvBlock(nn.Module):
    """FAN's hierarchical residual block (pre-activation, three 3x3 convolutions concatenated)."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, half, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, quarter, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = nn.Conv2d(quarter, out_planes - half - quarter, 3, 1, 1, bias=False)
        if in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_planes), nn.ReLU(True), nn.Conv2d(in_planes, out_planes, 1, 1, bias=False)
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
    """FAN hourglass: children ``b1_L``, ``b2_L``, ``b3_L`` for levels L = depth..1 and ``b2_plus_1``."""

    def __init__(self, depth: int, features: int):
        super().__init__()
        self.depth = depth
        self._add_level(depth, features)

    def _add_level(self, level: int, features: int) -> None:
        # the published registration order (b1, b2, the deeper levels, b3), so state dicts list alike
        self.add_module(f"b1_{level}", ConvBlock(features, features))
        self.add_module(f"b2_{level}", ConvBlock(features, features))
        if level > 1:
            self._add_level(level - 1, features)
        else:
            self.add_module("b2_plus_1", ConvBlock(features, features))
        self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _forward(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up1 = self._modules[f"b1_{level}"](x)
        low1 = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))  # max, as published
        if level > 1:
            low2 = self._forward(level - 1, low1)
        else:
            low2 = self._modules["b2_plus_1"](low1)
        low3 = self._modules[f"b3_{level}"](low2)
        return up1 + F.interpolate(low3, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.depth, x)


class EmoNet(nn.Module):
    """EmoNet: FAN face-alignment backbone + emotion head. ``forward`` gives a dict with
    ``expression`` (B x n logits), ``valence`` (B), ``arousal`` (B) and ``heatmap``.

    ``stem``, ``width`` and ``fc_hidden`` exist so tests can build narrow copies with the same
    parameter names; the published model is the default (64, 256, 128).
    """

    def __init__(self, n_expression: int = 8, num_modules: int = 2, n_blocks: int = 4, attention: bool = True,
                 stem: int = 64, width: int = 256, fc_hidden: int = 128, n_landmarks: int = 68,
                 hourglass_depth: int = 4):
        super().__init__()
        self.n_expression = n_expression
        self.num_modules = num_modules
        self.attention = attention
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(stem)
        self.conv2 = ConvBlock(stem, 2 * stem)
        self.conv3 = ConvBlock(2 * stem, 2 * stem)
        self.conv4 = ConvBlock(2 * stem, width)
        for i in range(num_modules):
            self.add_module(f"m{i}", HourGlass(hourglass_depth, width))
            self.add_module(f"top_m_{i}", ConvBlock(width, width))
            self.add_module(f"conv_last{i}", nn.Conv2d(width, width, 1, 1, 0))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(width))
            self.add_module(f"l{i}", nn.Conv2d(width, n_landmarks, 1, 1, 0))
            if i < num_modules - 1:
                self.add_module(f"bl{i}", nn.Conv2d(width, width, 1, 1, 0))
                self.add_module(f"al{i}", nn.Conv2d(n_landmarks, width, 1, 1, 0))
        n_in = width * (num_modules + 1) + (0 if attention else n_landmarks)
        self.conv1x1_input_emo_2 = nn.Conv2d(n_in, width, 1, 1, 0)
        blocks: list[nn.Module] = []
        for _ in range(n_blocks):
            blocks += [ConvBlock(width, width), nn.MaxPool2d(2, 2)]
        self.emo_net_2 = nn.Sequential(*blocks)
        self.avg_pool_2 = nn.AvgPool2d(4)
        self.emo_fc_2 = nn.Sequential(
            nn.Linear(width, fc_hidden), nn.BatchNorm1d(fc_hidden), nn.ReLU(inplace=True),
            nn.Linear(fc_hidden, n_expression + 2),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-2:] != (EMONET_INPUT_SIZE, EMONET_INPUT_SIZE):
            raise ValueError(f"EmoNet expects {EMONET_INPUT_SIZE} x {EMONET_INPUT_SIZE} inputs; got {tuple(x.shape)}")
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2, stride=2)
        x = self.conv4(self.conv3(x))
        previous = x
        features = []
        heatmap = None
        for i in range(self.num_modules):
            hg = self._modules[f"top_m_{i}"](self._modules[f"m{i}"](previous))
            ll = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](hg)))
            heatmap = self._modules[f"l{i}"](ll)
            if i < self.num_modules - 1:
                ll = self._modules[f"bl{i}"](ll)
                previous = previous + ll + self._modules[f"al{i}"](heatmap)
            features.append(ll)
        stacked = torch.cat(features, dim=1)
        if self.attention:
            stacked = stacked * heatmap.sum(dim=1, keepdim=True)
            emo = torch.cat([x, stacked], dim=1)
        else:
            emo = torch.cat([x, stacked, heatmap], dim=1)
        out = self.avg_pool_2(self.emo_net_2(self.conv1x1_input_emo_2(emo))).flatten(1)
        out = self.emo_fc_2(out)
        return {"heatmap": heatmap, "expression": out[:, :-2], "valence": out[:, -2], "arousal": out[:, -1]}


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix ``nn.DataParallel`` adds to every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def emonet_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping) and "emo_fc_2.3.weight" not in strip_module_prefix(checkpoint):
        for key in ("state_dict", "model", "net"):
            if isinstance(checkpoint.get(key), Mapping):
                return emonet_state_dict(checkpoint[key])
    if not isinstance(checkpoint, Mapping):
        raise ValueError("not a state dict")
    return strip_module_prefix(checkpoint)


def load_emonet(path: str | os.PathLike, device: str | torch.device = "cpu") -> EmoNet:
    """Load ``emonet_8.pth`` / ``emonet_5.pth`` (or a safetensors copy); the class count comes from the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"EmoNet weights not found: {path}. Put emonet_8.pth (from https://github.com/face-analysis/emonet, "
            "folder pretrained/) in ComfyUI/models/emotion"
        )
    state = emonet_state_dict(read_checkpoint(path))
    head = state.get("emo_fc_2.3.weight")
    if head is None:
        raise ValueError(f"{path} is not an EmoNet checkpoint: it has no 'emo_fc_2.3.weight'")
    n_expression = head.shape[0] - 2
    width = state["conv1x1_input_emo_2.weight"].shape[0] if "conv1x1_input_emo_2.weight" in state else 256
    stem = state["conv1.weight"].shape[0] if "conv1.weight" in state else 64
    with without_init():  # every weight comes from the file
        model = EmoNet(n_expression=n_expression, stem=stem, width=width, fc_hidden=head.shape[1])
    expected = model.state_dict()
    fill_batchnorm_counters(expected, state)
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or wrong:
        raise ValueError(
            f"{path} does not fit EmoNet ({n_expression} classes): missing keys "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}, wrong shapes {wrong[:8]}"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        logger.warning("EmoNet %s: ignoring %d keys the network does not have: %s", path, len(unexpected), unexpected[:8])
    assign_weights(model, {k: state[k] for k in expected})
    return model.eval().to(device)


def emotion_from_outputs(outputs: Mapping[str, torch.Tensor]) -> Emotion:
    """EmoNet outputs -> Emotion (valence/arousal clamped to -1..1, softmax probabilities, padded to 8)."""
    logits = outputs["expression"].float()
    probabilities = logits.softmax(dim=1)
    if probabilities.shape[1] < len(EMOTION_CLASSES):
        probabilities = F.pad(probabilities, (0, len(EMOTION_CLASSES) - probabilities.shape[1]))
    elif probabilities.shape[1] > len(EMOTION_CLASSES):
        raise ValueError(f"EmoNet gave {probabilities.shape[1]} classes; at most {len(EMOTION_CLASSES)} are known")
    valence = outputs["valence"].float().clamp(-1, 1)
    arousal = outputs["arousal"].float().clamp(-1, 1)
    return Emotion.from_parts(valence.cpu(), arousal.cpu(), probabilities.cpu())


def emonet_crops(images, landmarks: Landmarks | None = None, scale: float = EMONET_CROP_SCALE) -> torch.Tensor:
    """B x 256 x 256 x 3 face crops: a square ``scale`` x mean(w, h) around the landmarks, or, without
    landmarks, the whole image resized (for images that already are face crops)."""
    images = to_image_batch(images)
    if landmarks is not None:
        return landmark_square_crop(images, landmarks, scale=scale, size=EMONET_INPUT_SIZE,
                                    antialias=True, integer_side=False).images
    resized = F.interpolate(images.permute(0, 3, 1, 2), size=(EMONET_INPUT_SIZE, EMONET_INPUT_SIZE),
                            mode="bilinear", antialias=True, align_corners=False)
    return resized.permute(0, 2, 3, 1).clamp(0, 1)


@torch.no_grad()
def predict_emotion(model: EmoNet, images, landmarks: Landmarks | None = None, scale: float = EMONET_CROP_SCALE,
                    batch_size: int = 8) -> tuple[Emotion, torch.Tensor]:
    """Emotion of each image (B x H x W x 3, 0..1). Returns the Emotion and the 256 x 256 crops used."""
    model.eval()
    crops = emonet_crops(images, landmarks, scale)
    parameter = next(model.parameters())
    results = []
    for start in range(0, crops.shape[0], batch_size):
        chunk = crops[start : start + batch_size].permute(0, 3, 1, 2).contiguous()
        results.append(emotion_from_outputs(model(chunk.to(parameter.device, parameter.dtype))))
    return Emotion.concat(results), crops


# --- manual emotions ---------------------------------------------------------------------------

# Approximate positions of the classes on the valence/arousal circumplex (EmoNet's -1..1 scale),
# after Russell's circumplex model and the AffectNet class means; used by the manual builders.
EMOTION_CIRCUMPLEX: dict[str, tuple[float, float]] = {
    "Neutral": (0.0, 0.0),
    "Happy": (0.7, 0.3),
    "Sad": (-0.6, -0.3),
    "Surprise": (0.2, 0.7),
    "Fear": (-0.5, 0.7),
    "Disgust": (-0.65, 0.3),
    "Anger": (-0.55, 0.65),
    "Contempt": (-0.45, 0.2),
}


def _class_index(name: str) -> int:
    for i, known in enumerate(EMOTION_CLASSES):
        if known.lower() == str(name).strip().lower():
            return i
    raise ValueError(f"unknown emotion class {name!r}; known: {', '.join(EMOTION_CLASSES)}")


def emotion_from_class(name: str, intensity: float = 1.0, valence: float | None = None,
                       arousal: float | None = None) -> Emotion:
    """One-row Emotion for a class at ``intensity`` (0..1, clamped with a warning).

    Probabilities: ``intensity`` on the class, the rest on Neutral. Valence/arousal:
    ``intensity`` x the class's circumplex position, unless given.
    """
    index = _class_index(name)
    if not 0.0 <= intensity <= 1.0:
        logger.warning("emotion intensity %s is outside 0..1; clamped", intensity)
        intensity = min(max(float(intensity), 0.0), 1.0)
    probabilities = torch.zeros(len(EMOTION_CLASSES))
    probabilities[0] = 1.0 - intensity
    probabilities[index] += intensity
    centre_v, centre_a = EMOTION_CIRCUMPLEX[EMOTION_CLASSES[index]]
    v = _clamp_unit("valence", centre_v * intensity if valence is None else valence)
    a = _clamp_unit("arousal", centre_a * intensity if arousal is None else arousal)
    return Emotion.from_parts(v, a, probabilities)


def emotion_from_valence_arousal(valence: float, arousal: float, temperature: float = 0.1) -> Emotion:
    """One-row Emotion from valence/arousal (-1..1, clamped with a warning).

    Probabilities are a softmax over the classes of ``-d^2 / temperature``, d the distance from
    (valence, arousal) to each class's circumplex position: a soft nearest-class assignment.
    """
    v = _clamp_unit("valence", valence)
    a = _clamp_unit("arousal", arousal)
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be positive; got {temperature}")
    centres = torch.tensor([EMOTION_CIRCUMPLEX[c] for c in EMOTION_CLASSES])
    distances = ((centres - torch.tensor([v, a])) ** 2).sum(dim=1)
    return Emotion.from_parts(v, a, (-distances / temperature).softmax(dim=0))


def _clamp_unit(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number: {value}")
    if not -1.0 <= value <= 1.0:
        logger.warning("%s %s is outside -1..1; clamped", what, value)
        value = min(max(value, -1.0), 1.0)
    return value
