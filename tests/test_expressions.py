"""Expression value types: validation, batches, interpolation and JSON round trips."""

import json

import pytest
import torch
from mediapipe.tasks.python.vision import face_landmarker

from encoders.expressions import (
    ARKIT_BLENDSHAPE_NAMES,
    EMOTION_CLASSES,
    IRIS_CENTRES,
    ArkitBlendshapes,
    Emotion,
    FlameExpression,
    Landmarks,
    value_from_json,
)


def _random(cls, batch=2):
    if cls is FlameExpression:
        return FlameExpression(torch.randn(batch, 55))
    if cls is ArkitBlendshapes:
        return ArkitBlendshapes(torch.rand(batch, 52))
    if cls is Landmarks:
        return Landmarks(torch.rand(batch, 478, 3), image_size=(480, 640))
    probs = torch.rand(batch, 8).softmax(dim=1)
    return Emotion(torch.cat([torch.rand(batch, 2) * 2 - 1, probs], dim=1))


ALL = [FlameExpression, ArkitBlendshapes, Landmarks, Emotion]


def test_arkit_names_follow_mediapipe():
    assert len(ARKIT_BLENDSHAPE_NAMES) == 52 and ARKIT_BLENDSHAPE_NAMES[0] == "_neutral"
    assert len(set(ARKIT_BLENDSHAPE_NAMES)) == 52

    def camel(name):
        parts = name.lower().split("_")
        return parts[0] + "".join(p.title() for p in parts[1:])

    expected = ["_neutral"] + [camel(b.name) for b in face_landmarker.Blendshapes][1:]
    assert list(ARKIT_BLENDSHAPE_NAMES) == expected


@pytest.mark.parametrize("cls", ALL)
def test_shape_and_finite_validation(cls):
    value = _random(cls)
    assert len(value) == 2 and value.values.dtype == torch.float32
    with pytest.raises(ValueError, match="must have shape"):
        cls(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="must have shape"):
        cls(torch.zeros(0, *cls.row_shape))
    bad = value.values.clone()
    bad[1].view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in batch row 2 \(counting from 1\)"):
        cls(bad)
    # a single row without batch dimension is accepted
    assert len(cls(value.values[0])) == 1


@pytest.mark.parametrize("cls", ALL)
def test_json_round_trip_and_kind_check(cls):
    value = _random(cls, 3)
    back = cls.from_json(value.to_json())
    assert torch.equal(back.values, value.values)
    assert type(value_from_json(value.to_json())) is cls
    other = FlameExpression if cls is not FlameExpression else Emotion
    with pytest.raises(ValueError, match=f"{other.kind}: got a preset of kind '{cls.kind}'. Expected a JSON list"):
        other.from_json(value.to_json())
    wrong_length = json.dumps({"kind": cls.kind, "values": [[0.0] * 5]})
    with pytest.raises(ValueError, match="must have shape"):
        cls.from_json(wrong_length)
    with pytest.raises(ValueError, match="not valid JSON"):
        cls.from_json("{oops")


def test_landmarks_keep_image_size():
    value = _random(Landmarks)
    assert Landmarks.from_json(value.to_json()).image_size == (480, 640)
    assert value.interpolate(value, 0.5).image_size == (480, 640)
    assert value.row(1).image_size == (480, 640)
    pixels = value.pixels()
    assert torch.allclose(pixels[..., 0], value.values[..., 0] * 640)
    assert torch.allclose(pixels[..., 1], value.values[..., 1] * 480)
    assert IRIS_CENTRES == (468, 473)
    assert torch.equal(value.iris_centres()[:, 1], value.values[:, 473])
    back = Landmarks.from_pixels(pixels, (480, 640), z=value.values[..., 2])
    assert torch.allclose(back.values, value.values, atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_interpolation_and_batches(cls):
    a, b = _random(cls, 1), _random(cls, 1)
    assert torch.allclose(a.interpolate(b, 0.0).values, a.values)
    assert torch.allclose(a.interpolate(b, 1.0).values, b.values, atol=1e-6)
    mid = a.interpolate(b, 0.5)
    assert torch.allclose(mid.values, (a.values + b.values) / 2, atol=1e-6)
    many = cls.concat([a, b, a])
    assert len(many) == 3 and torch.equal(many.select([2, 0]).values, torch.cat([a.values, a.values]))
    assert a.rows_for(4).shape == (4, *cls.row_shape)
    with pytest.raises(ValueError, match="rows but the batch has"):
        many.rows_for(2)
    assert len(a.repeat_to(5)) == 5
    with pytest.raises(IndexError):
        many.row(3)


def test_flame_parts_and_clamps():
    expression = FlameExpression.from_parts(torch.ones(50), eyelids=[2.0, -1.0], jaw=[-0.3, 0.5, -0.5])
    assert expression.expression.shape == (1, 50) and torch.equal(expression.eyelids, torch.tensor([[2.0, -1.0]]))
    clamped = expression.clamped()
    assert clamped.eyelids.tolist() == [[1.0, 0.0]]
    assert torch.allclose(clamped.jaw, torch.tensor([[0.0, 0.2, -0.2]]))
    assert torch.equal(FlameExpression.neutral(3).values, torch.zeros(3, 55))


def test_blendshape_and_emotion_ranges():
    with pytest.raises(ValueError, match=r"blendshape scores must lie in \[0.0, 1.0\]; rows \[0\]"):
        ArkitBlendshapes(torch.full((1, 52), 1.5))
    shapes = ArkitBlendshapes.from_dict({"jawOpen": 0.7})
    assert shapes.as_dicts()[0]["jawOpen"] == pytest.approx(0.7)
    with pytest.raises(KeyError, match="did you mean jawOpen"):
        ArkitBlendshapes.from_dict({"jawopen": 0.2})
    with pytest.raises(ValueError, match="valence and arousal"):
        Emotion(torch.tensor([2.0, 0.0] + [0.125] * 8))
    with pytest.raises(ValueError, match="class probabilities"):
        Emotion(torch.tensor([0.0, 0.0] + [-0.5] + [0.0] * 7))
    emotion = Emotion.from_parts(0.5, -0.2, [0.1, 0.6, 0.3, 0, 0, 0, 0, 0])
    assert emotion.dominant() == ["Happy"] and emotion.valence.item() == pytest.approx(0.5)
    assert Emotion.neutral().dominant() == ["Neutral"] and EMOTION_CLASSES[0] == "Neutral"
    normalized = Emotion.from_parts(0, 0, [0, 0.2, 0.2, 0, 0, 0, 0, 0]).normalized()
    assert normalized.probabilities.sum().item() == pytest.approx(1.0)


def test_value_from_json_unknown_kind():
    with pytest.raises(ValueError, match="unknown expression kind"):
        value_from_json(json.dumps({"kind": "pose", "values": [1]}))
