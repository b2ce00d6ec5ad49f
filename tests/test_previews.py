"""Preview images: shapes, ranges, determinism, and that they show the values."""

import pytest
import torch

from encoders.expressions import ArkitBlendshapes, Emotion, FlameExpression, Landmarks
from encoders.previews import BACKGROUND, BAR, blendshape_chart, emotion_chart, flame_chart, landmarks_overlay


def _is_image_batch(images, batch):
    assert images.dim() == 4 and images.shape[0] == batch and images.shape[-1] == 3
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1


def _colour_count(image, colour):
    pixels = (image * 255).round().to(torch.int64)
    return int((pixels == torch.tensor(colour)).all(dim=-1).sum())


def test_blendshape_chart_bars_follow_scores():
    low = ArkitBlendshapes.from_dict({"jawOpen": 0.2})
    high = ArkitBlendshapes.from_dict({"jawOpen": 0.9})
    chart = blendshape_chart(ArkitBlendshapes.concat([low, high]))
    _is_image_batch(chart, 2)
    assert _colour_count(chart[1], BAR) > 3 * _colour_count(chart[0], BAR) > 0
    assert torch.equal(chart, blendshape_chart(ArkitBlendshapes.concat([low, high])))
    assert _colour_count(blendshape_chart(ArkitBlendshapes.neutral())[0], BAR) == 0


def test_flame_chart():
    expression = FlameExpression(torch.randn(3, 55)).clamped()
    chart = flame_chart(expression, width=640, height=240)
    _is_image_batch(chart, 3)
    assert chart.shape[1:3] == (240, 640)
    empty = flame_chart(FlameExpression.neutral())
    assert _colour_count(empty[0], BAR) == 0 and _colour_count(empty[0], BACKGROUND) > 0
    with pytest.raises(ValueError):
        flame_chart(expression, width=100, height=50)


def test_emotion_chart():
    emotion = Emotion.concat([Emotion.neutral(), Emotion.from_parts(0.8, 0.5, [0, 1, 0, 0, 0, 0, 0, 0])])
    chart = emotion_chart(emotion)
    _is_image_batch(chart, 2)
    assert not torch.equal(chart[0], chart[1])


def test_landmarks_overlay():
    face = torch.zeros(478, 3)
    face[:, 0] = 0.3 + 0.4 * torch.rand(478)
    face[:, 1] = 0.3 + 0.4 * torch.rand(478)
    images = torch.full((2, 64, 96, 3), 0.25)
    overlay = landmarks_overlay(images, Landmarks(face))
    _is_image_batch(overlay, 2)
    assert torch.equal(overlay[0], overlay[1]) and not torch.equal(overlay[0], images[0])
    assert torch.allclose(overlay[0, 0, 0], torch.tensor(0.25), atol=1 / 255)  # outside the face untouched
    # one picture, several faces: all drawn on the one image
    two_faces = Landmarks(torch.stack([face, face * 0.5]))
    together = landmarks_overlay(images[:1], two_faces)
    assert together.shape[0] == 1
    changed = (together[0] - images[0]).abs().sum(dim=-1) > 0
    assert changed[: 64 // 3, : 96 // 3].any()  # the small face in the top-left corner
