"""Editors, neutralize, easing/interpolation, keyframes, smoothing and presets."""

import json
import logging

import pytest
import torch

from encoders.expression_edit import (
    BUILTIN_PRESETS,
    EASINGS,
    FLAME_CONTROLS,
    builtin_preset,
    ease,
    edit_blendshapes,
    edit_flame,
    flame_control_specs,
    interpolate_frames,
    keyframe_sequence,
    keyframes_from_rows,
    list_presets,
    load_preset,
    load_preset_file,
    neutralize,
    save_preset,
    smooth_sequence,
)
from encoders.expressions import ArkitBlendshapes, Emotion, FlameExpression, Landmarks


def test_flame_editor_set_offset_and_clamp(caplog):
    edited = edit_flame(None, mode="set", jaw_open=0.3, eyelid_left=1.0, expression_1=1.5)
    assert edited.values[0, 52].item() == pytest.approx(0.3)
    assert edited.values[0, 50].item() == 1.0 and edited.values[0, 0].item() == 1.5
    assert edited.values[0, 51].item() == 0.0
    offset = edit_flame(edited, jaw_open=0.1, expression_1=None, eyelid_left=0.0)
    assert offset.values[0, 52].item() == pytest.approx(0.4) and offset.values[0, 0].item() == 1.5
    with caplog.at_level(logging.WARNING):
        clamped = edit_flame(None, mode="set", jaw_sideways=0.9, controls={"expression_2": -7})
    assert clamped.values[0, 53].item() == pytest.approx(0.2) and clamped.values[0, 1].item() == -3.0
    assert "jaw_sideways" in caplog.text and "expression_2" in caplog.text
    with pytest.raises(KeyError, match="unknown FLAME control"):
        edit_flame(None, smile=1.0)
    with pytest.raises(ValueError, match="finite"):
        edit_flame(None, jaw_open=float("nan"))
    batch = edit_flame(FlameExpression(torch.zeros(3, 55)), jaw_open=0.2)
    assert len(batch) == 3 and torch.allclose(batch.values[:, 52], torch.full((3,), 0.2))
    specs = flame_control_specs(10)
    assert [s.name for s in specs[:5]] == ["jaw_open", "jaw_sideways", "jaw_twist", "eyelid_left", "eyelid_right"]
    assert specs[5].index == 0 and specs[-1].name == "expression_10" and len(FLAME_CONTROLS) == 55


def test_blendshape_editor(caplog):
    edited = edit_blendshapes(None, {"jawOpen": 0.5}, mouthSmileLeft=0.25)
    assert edited.as_dicts()[0]["jawOpen"] == 0.5 and edited.as_dicts()[0]["mouthSmileLeft"] == 0.25
    with caplog.at_level(logging.WARNING):
        more = edit_blendshapes(edited, {"jawOpen": 0.8}, mode="offset")
    assert more.as_dicts()[0]["jawOpen"] == 1.0 and "jawOpen" in caplog.text
    with pytest.raises(KeyError, match="did you mean"):
        edit_blendshapes(None, {"jawOpn": 0.2})


def test_neutralize():
    expression = FlameExpression(torch.ones(2, 55))
    assert torch.equal(neutralize(expression).values, torch.zeros(2, 55))
    half = neutralize(expression, 0.5)
    assert torch.allclose(half.values, torch.full((2, 55), 0.5))
    jaw_only = neutralize(expression, parts=["jaw"])
    assert torch.equal(jaw_only.values[:, 52:], torch.zeros(2, 3)) and torch.equal(jaw_only.values[:, :52], torch.ones(2, 52))
    emotion = neutralize(Emotion.from_parts(0.5, 0.5, [0, 1, 0, 0, 0, 0, 0, 0]))
    assert emotion.dominant() == ["Neutral"] and emotion.valence.item() == 0
    assert neutralize(ArkitBlendshapes(torch.rand(1, 52))).values.abs().max() == 0
    with pytest.raises(TypeError):
        neutralize(Landmarks(torch.rand(1, 478, 3)))


def test_easing_curves():
    t = torch.linspace(0, 1, 11)
    for name in EASINGS:
        curve = ease(t, name)
        assert curve[0] == 0 and curve[-1] == 1 and (curve.diff() >= 0).all(), name
    assert ease(0.5, "ease_in") == pytest.approx(0.25)
    assert ease(0.5, "ease-out") == pytest.approx(0.75)
    assert ease(0.5, "ease_in_out") == pytest.approx(0.5)
    assert ease(0.25, "ease_in_out") < 0.25 < ease(0.75, "ease_in_out") - 0.5
    with pytest.raises(ValueError, match="unknown easing"):
        ease(0.5, "bounce")


@pytest.mark.parametrize("easing", EASINGS)
def test_interpolate_frames_endpoints(easing):
    a = FlameExpression.neutral()
    b = edit_flame(None, mode="set", jaw_open=0.4, expression_1=2.0)
    frames = interpolate_frames(a, b, 9, easing)
    assert len(frames) == 9
    assert torch.equal(frames.values[0], a.values[0]) and torch.allclose(frames.values[-1], b.values[0])
    assert (frames.values[:, 52].diff() >= 0).all()
    # the middle frame is at t = 0.5: t, t^2, 1 - (1 - t)^2 and smoothstep 3t^2 - 2t^3 give these, by hand
    expected_mid = {"linear": 0.5, "ease_in": 0.25, "ease_out": 0.75, "ease_in_out": 0.5}[easing] * 0.4
    assert frames.values[4, 52].item() == pytest.approx(expected_mid, abs=1e-6)
    assert len(interpolate_frames(a, b, 1)) == 1
    with pytest.raises(TypeError):
        interpolate_frames(a, Emotion.neutral(), 3)
    with pytest.raises(ValueError, match="one row"):
        interpolate_frames(FlameExpression.neutral(2), b, 3)


def test_landmark_and_emotion_interpolation_keep_type():
    a, b = Landmarks(torch.zeros(1, 478, 3), image_size=(10, 20)), Landmarks(torch.ones(1, 478, 3) * 0.5)
    frames = interpolate_frames(a, b, 3)
    assert frames.values.shape == (3, 478, 3) and frames.image_size == (10, 20)
    emotions = interpolate_frames(Emotion.neutral(), emotion_happy(), 5, "ease_in_out")
    assert torch.allclose(emotions.probabilities.sum(dim=1), torch.ones(5))


def emotion_happy():
    return Emotion.from_parts(0.7, 0.3, [0, 1, 0, 0, 0, 0, 0, 0])


def test_keyframes():
    a = FlameExpression.neutral()
    b = edit_flame(None, mode="set", jaw_open=0.4)
    c = edit_flame(None, mode="set", jaw_open=0.1)
    sequence = keyframe_sequence([(6, c), (2, a), (4, b)], 9)
    jaw = sequence.values[:, 52]
    assert len(sequence) == 9
    assert jaw[:3].tolist() == [0.0, 0.0, 0.0]  # held before the first keyframe
    assert jaw[4].item() == pytest.approx(0.4) and jaw[6].item() == pytest.approx(0.1)
    assert jaw[3].item() == pytest.approx(0.2) and jaw[5].item() == pytest.approx(0.25)
    assert jaw[7].item() == pytest.approx(0.1) and jaw[8].item() == pytest.approx(0.1)
    eased = keyframe_sequence([(0, a), (4, b)], 5, "ease_in")
    assert eased.values[2, 52].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="share a frame"):
        keyframe_sequence([(1, a), (1, b)], 4)
    with pytest.raises(ValueError, match="must lie in"):
        keyframe_sequence([(0, a), (4, b)], 4)
    with pytest.raises(TypeError):
        keyframe_sequence([(0, a), (2, Emotion.neutral())], 4)
    rows = FlameExpression.concat([a, b, c])
    assert torch.equal(keyframes_from_rows(rows, "2, 4 6", 9).values, sequence.values)
    with pytest.raises(ValueError, match="one frame per row"):
        keyframes_from_rows(rows, "0, 4", 9)
    with pytest.raises(ValueError, match="whole numbers"):
        keyframes_from_rows(rows, "0, x, 4", 9)


def test_smoothing():
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 40)
    clean = torch.zeros(40, 55)
    clean[:, 0] = t * 2 - 1  # a ramp
    noisy = FlameExpression(clean + 0.1 * torch.randn(40, 55))
    for method in ("ema", "moving_average", "savgol"):
        smoothed = smooth_sequence(noisy, method, strength=0.6, window=7)
        assert len(smoothed) == 40
        assert (smoothed.values - clean).abs().mean() < (noisy.values - clean).abs().mean(), method
    ramp = FlameExpression(clean)
    assert torch.allclose(smooth_sequence(ramp, "savgol", window=7, order=2).values, clean, atol=1e-5)
    assert torch.allclose(smooth_sequence(noisy, "ema", strength=0.0).values, noisy.values)
    constant = FlameExpression(torch.ones(10, 55))
    for method in ("ema", "moving_average", "savgol"):
        assert torch.allclose(smooth_sequence(constant, method).values, constant.values, atol=1e-5)
    shapes = smooth_sequence(ArkitBlendshapes(torch.rand(12, 52)), "savgol", window=5, order=3)
    assert shapes.values.min() >= 0 and shapes.values.max() <= 1
    emotions = Emotion.concat([Emotion.neutral(), emotion_happy(), Emotion.neutral(), emotion_happy()])
    smoothed = smooth_sequence(emotions, "savgol", window=3, order=2)
    assert torch.allclose(smoothed.probabilities.sum(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        smooth_sequence(noisy, "moving_average", window=4)
    with pytest.raises(ValueError, match="unknown smoothing"):
        smooth_sequence(noisy, "kalman")
    # one frame has nothing to smooth against: every method gives it back as it is
    single = FlameExpression(torch.linspace(-1.0, 1.0, 55).unsqueeze(0))
    for method in ("ema", "moving_average", "savgol"):
        assert torch.equal(smooth_sequence(single, method).values, single.values)


def test_presets_json_round_trip(tmp_path):
    expression = edit_flame(None, mode="set", jaw_open=0.25, expression_3=-1.0)
    path = save_preset(expression, tmp_path, "my smile")
    assert path == tmp_path / "flame_expression" / "my smile.json"
    data = json.loads(path.read_text())  # plain JSON, never a pickle
    assert data["kind"] == "flame_expression" and len(data["values"][0]) == 55
    loaded = load_preset(tmp_path, "my smile", FlameExpression)
    assert torch.equal(loaded.values, expression.values)
    assert "my smile" in list_presets(tmp_path, FlameExpression)
    assert list_presets(tmp_path, FlameExpression)[: len(BUILTIN_PRESETS["flame_expression"])] == list(
        BUILTIN_PRESETS["flame_expression"])
    shapes = edit_blendshapes(None, {"jawOpen": 0.5})
    save_preset(shapes, tmp_path, "open")
    assert torch.equal(load_preset_file(tmp_path / "arkit_blendshapes" / "open.json").values, shapes.values)
    with pytest.raises(FileExistsError):
        save_preset(expression, tmp_path, "my smile", overwrite=False)


def test_preset_errors(tmp_path):
    folder = tmp_path / "flame_expression"
    folder.mkdir()
    (folder / "wrong_kind.json").write_text(json.dumps(Emotion.neutral().to_dict()))
    with pytest.raises(ValueError, match=r"got a preset of kind 'emotion'\. Expected a JSON list of 55 numbers"):
        load_preset(tmp_path, "wrong_kind", FlameExpression)
    (folder / "short.json").write_text(json.dumps({"kind": "flame_expression", "values": [[0.0] * 54]}))
    with pytest.raises(ValueError, match=r"short.json.*shape \(batch, 55\)"):
        load_preset(tmp_path, "short", FlameExpression)
    (folder / "nan.json").write_text('{"kind": "flame_expression", "values": [' + ",".join(["NaN"] * 55) + "]}")
    with pytest.raises(ValueError, match="NaN"):
        load_preset(tmp_path, "nan", FlameExpression)
    with pytest.raises(FileNotFoundError, match="available"):
        load_preset(tmp_path, "nothing", FlameExpression)
    for bad in ("../escape", "a/b", ".hidden", "", "ok\n", "ok\n.json"):  # "$" once let a final newline in
        with pytest.raises(ValueError, match="invalid preset name"):
            save_preset(FlameExpression.neutral(), tmp_path, bad)


def test_builtin_presets():
    for kind, presets in BUILTIN_PRESETS.items():
        for name in presets:
            value = builtin_preset(kind, name)
            assert value.kind == kind and len(value) == 1
    assert load_preset("/nonexistent", "smile", ArkitBlendshapes).as_dicts()[0]["mouthSmileLeft"] > 0.5
    assert builtin_preset("emotion", "happy").dominant() == ["Happy"]
    with pytest.raises(KeyError):
        builtin_preset("emotion", "bored")
