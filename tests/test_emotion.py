"""EmoNet-compatible network: published key names, `module.` stripping, outputs; manual emotions."""

import logging

import pytest
import torch

from encoders.emotion import (
    EMOTION_CIRCUMPLEX,
    EmoNet,
    emonet_crops,
    emotion_from_class,
    emotion_from_outputs,
    emotion_from_valence_arousal,
    load_emonet,
    predict_emotion,
    strip_module_prefix,
)
from encoders.expressions import EMOTION_CLASSES, Emotion, Landmarks

TINY = {"stem": 8, "width": 16, "fc_hidden": 16}


def _tiny(n_expression=8, seed=0):
    torch.manual_seed(seed)
    model = EmoNet(n_expression=n_expression, **TINY)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in trained weights
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_full_size_key_names_and_shapes():
    state = EmoNet().state_dict()
    expected = {
        "conv1.weight": (64, 3, 7, 7), "conv1.bias": (64,), "bn1.running_mean": (64,),
        "conv2.conv1.weight": (64, 64, 3, 3), "conv2.downsample.0.weight": (64,),
        "conv2.downsample.2.weight": (128, 64, 1, 1), "conv4.downsample.2.weight": (256, 128, 1, 1),
        "m0.b1_4.conv1.weight": (128, 256, 3, 3), "m0.b2_plus_1.conv3.weight": (64, 64, 3, 3),
        "m1.b3_1.bn3.running_var": (64,), "top_m_1.conv2.weight": (64, 128, 3, 3),
        "conv_last0.weight": (256, 256, 1, 1), "bn_end1.weight": (256,), "l1.weight": (68, 256, 1, 1),
        "bl0.weight": (256, 256, 1, 1), "al0.weight": (256, 68, 1, 1),
        "conv1x1_input_emo_2.weight": (256, 768, 1, 1), "emo_net_2.0.conv1.weight": (128, 256, 3, 3),
        "emo_net_2.6.bn3.weight": (64,), "emo_fc_2.0.weight": (128, 256), "emo_fc_2.1.running_var": (128,),
        "emo_fc_2.3.weight": (10, 128),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "bl1.weight" not in state and "al1.weight" not in state and "conv3.downsample.0.weight" not in state
    assert not any(k.startswith("emo_net_2.1.") for k in state)  # MaxPool has no parameters
    assert "m0.b2_plus_2.bn1.weight" not in state


def test_tiny_network_outputs():
    model = _tiny()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 256, 256))
    assert outputs["expression"].shape == (2, 8) and outputs["valence"].shape == (2,)
    assert outputs["heatmap"].shape == (2, 68, 64, 64)
    emotion = emotion_from_outputs(outputs)
    assert isinstance(emotion, Emotion) and emotion.values.shape == (2, 10)
    assert torch.allclose(emotion.probabilities.sum(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="256 x 256"):
        model(torch.rand(1, 3, 128, 128))


def test_load_strips_module_prefix(tmp_path):
    model = _tiny()
    path = tmp_path / "emonet_8.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    loaded = load_emonet(path)
    saved = torch.load(path, weights_only=True)
    for key, tensor in loaded.state_dict().items():  # BatchNorm statistics too; nothing left on the meta device
        assert tensor.device == torch.device("cpu") and tensor.dtype == saved["module." + key].dtype, key
        assert torch.equal(tensor, saved["module." + key]), key
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for key in ("expression", "valence", "arousal"):
        assert torch.allclose(a[key], b[key], atol=1e-5)
    assert strip_module_prefix({"module.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_five_class_model_pads_to_eight(tmp_path):
    model = _tiny(n_expression=5)
    torch.save(model.state_dict(), tmp_path / "emonet_5.pth")
    loaded = load_emonet(tmp_path / "emonet_5.pth")
    assert loaded.n_expression == 5
    emotion, crops = predict_emotion(loaded, torch.rand(1, 300, 200, 3))
    assert crops.shape == (1, 256, 256, 3)
    assert emotion.probabilities[0, 5:].abs().max() == 0
    assert emotion.probabilities.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_load_errors_and_extra_keys(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="emonet_8.pth"):
        load_emonet(tmp_path / "none.pth")
    state = {"module." + k: v for k, v in _tiny().state_dict().items()}
    del state["module.l0.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \['l0.weight'\]"):
        load_emonet(tmp_path / "broken.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an EmoNet checkpoint"):
        load_emonet(tmp_path / "other.pth")
    extra = dict(_tiny().state_dict())
    extra["temporal_weights"] = torch.ones(5)
    extra = {k: v for k, v in extra.items() if not k.endswith("num_batches_tracked")}
    torch.save(extra, tmp_path / "extra.pth")
    with caplog.at_level(logging.WARNING):
        loaded = load_emonet(tmp_path / "extra.pth")
    assert "temporal_weights" in caplog.text
    for key, tensor in loaded.state_dict().items():  # absent BatchNorm counters start at 0
        expected = extra.get(key, torch.tensor(0))
        assert not tensor.is_meta and tensor.dtype == expected.dtype and torch.equal(tensor, expected), key


def test_predict_with_landmark_crop():
    face = torch.zeros(478, 3)
    face[:, 0] = torch.linspace(0.3, 0.7, 478)
    face[:, 1] = torch.linspace(0.2, 0.8, 478)
    image = torch.rand(1, 200, 300, 3)
    crops = emonet_crops(image, Landmarks(face))
    assert crops.shape == (1, 256, 256, 3)
    emotion, _ = predict_emotion(_tiny(), torch.cat([image, image]), Landmarks(face))
    assert len(emotion) == 2 and torch.allclose(emotion.values[0], emotion.values[1], atol=1e-5)


def test_manual_emotions(caplog):
    happy = emotion_from_class("happy", 0.6)
    assert happy.probabilities[0, 1].item() == pytest.approx(0.6)
    assert happy.probabilities[0, 0].item() == pytest.approx(0.4)
    assert happy.valence.item() == pytest.approx(0.6 * EMOTION_CIRCUMPLEX["Happy"][0])
    full = emotion_from_class("Anger")
    assert full.dominant() == ["Anger"] and full.probabilities.sum().item() == pytest.approx(1.0)
    with caplog.at_level(logging.WARNING):
        clamped = emotion_from_class("Sad", 1.7)
    assert "clamped" in caplog.text and clamped.probabilities[0, 2].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown emotion class"):
        emotion_from_class("Joy")
    for name in EMOTION_CLASSES:
        v, a = EMOTION_CIRCUMPLEX[name]
        assert emotion_from_valence_arousal(v, a).dominant() == [name]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = emotion_from_valence_arousal(1.5, 0.0)
    assert out.valence.item() == 1.0 and "valence" in caplog.text
    with pytest.raises(ValueError, match="finite"):
        emotion_from_valence_arousal(float("nan"), 0.0)
