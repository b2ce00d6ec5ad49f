"""SMIRK expression encoder: published key names, strict loading, output clamps, the real photo."""

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.expressions import FlameExpression, Landmarks
from encoders.face_crops import smirk_crop, transform_points
from encoders.smirk import (
    SMIRK_PREFIX,
    SmirkExpressionEncoder,
    encode_expression,
    expression_encoder_state_dict,
    load_smirk_encoder,
    smirk_input,
)

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


def _t1_picture():
    spec = importlib.util.find_spec("insightface")  # locate without importing (slow)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / "t1.jpg"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmirkExpressionEncoder().eval()


def _published_checkpoint(model: SmirkExpressionEncoder) -> dict:
    """What SMIRK_em1.pt looks like: the whole trainer's flat state dict."""
    checkpoint = {SMIRK_PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    checkpoint["smirk_encoder.pose_encoder.encoder.conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    checkpoint["smirk_encoder.shape_encoder.shape_layers.0.weight"] = torch.zeros(300, 960)
    checkpoint["smirk_generator.encoder.0.weight"] = torch.zeros(8, 4)
    return checkpoint


def test_state_dict_uses_published_names(model):
    keys = set(model.state_dict())
    assert {"encoder.conv_stem.weight", "encoder.bn1.running_var", "encoder.blocks.6.0.conv.weight",
            "expression_layers.0.weight", "expression_layers.0.bias"} <= keys
    assert model.state_dict()["expression_layers.0.weight"].shape == (55, 960)


def test_loads_strictly_from_pt_and_clamps(model, tmp_path):
    model = copy.deepcopy(model)
    with torch.no_grad():  # push raw outputs far outside the clamps
        model.expression_layers[0].weight[50:].zero_()
        bias = model.expression_layers[0].bias
        bias[50], bias[51], bias[52], bias[53], bias[54] = 5.0, -5.0, -3.0, 4.0, -4.0
    path = tmp_path / "SMIRK_em1.pt"
    torch.save(_published_checkpoint(model), path)
    loaded = load_smirk_encoder(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = loaded(x)
        raw = loaded.raw(x)
    assert out.shape == (2, 55)
    assert torch.equal(out[:, :50], raw[:, :50])
    assert (out[:, 50:52] >= 0).all() and (out[:, 50:52] <= 1).all()
    assert torch.allclose(out[:, 50], torch.ones(2)) and torch.allclose(out[:, 51], torch.zeros(2))
    assert torch.equal(out[:, 52], torch.relu(raw[:, 52]))
    assert out[:, 53:55].abs().max() <= 0.2 + 1e-6
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)


def test_load_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="SMIRK_em1.pt"):
        load_smirk_encoder(tmp_path / "missing.pt")
    checkpoint = _published_checkpoint(model)
    del checkpoint[SMIRK_PREFIX + "expression_layers.0.bias"]
    path = tmp_path / "broken.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"broken\.pt does not fit .*missing keys \['expression_layers\.0\.bias'\]"):
        load_smirk_encoder(path)
    unrelated = tmp_path / "other.pt"
    torch.save({"unet.weight": torch.zeros(1)}, unrelated)
    with pytest.raises(ValueError, match="is not a SMIRK checkpoint"):
        load_smirk_encoder(unrelated)
    extra = _published_checkpoint(model)
    extra[SMIRK_PREFIX + "expression_layers.1.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected keys"):
        load_smirk_encoder(tmp_path / "extra.pt")


def test_batchnorm_counters_optional_and_nested(model, tmp_path):
    checkpoint = {k: v for k, v in _published_checkpoint(model).items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": checkpoint}, tmp_path / "nested.pt")
    loaded = load_smirk_encoder(tmp_path / "nested.pt")
    for key, tensor in loaded.state_dict().items():  # nothing left on the meta device; absent counters start at 0
        expected = checkpoint.get(SMIRK_PREFIX + key, torch.tensor(0))
        assert tensor.device == torch.device("cpu") and tensor.dtype == expected.dtype and torch.equal(tensor, expected), key
    assert set(expression_encoder_state_dict(checkpoint)) < set(model.state_dict())


def test_channel_order():
    crops = torch.rand(1, 8, 8, 3)
    rgb, bgr = smirk_input(crops, "RGB"), smirk_input(crops, "bgr")
    assert rgb.shape == (1, 3, 8, 8) and torch.equal(bgr, rgb.flip(1))
    with pytest.raises(ValueError, match="channel_order"):
        smirk_input(crops, "HSV")


def test_runs_on_real_photo_with_given_landmarks(model):
    import cv2

    picture = _t1_picture()
    npz = TESTDATA / "t1_faces.npz"
    if not npz.is_file() or picture is None:
        pytest.skip("t1 test data not available")
    image = cv2.imread(str(picture))[..., ::-1].copy()
    faces = np.load(npz)["lm478"]
    height, width = image.shape[:2]
    landmarks = Landmarks(torch.from_numpy(faces).float(), image_size=(height, width))
    images = torch.from_numpy(image).float().div(255).unsqueeze(0).expand(3, -1, -1, -1)
    expression, crops = encode_expression(model, images, landmarks, channel_order="BGR")
    assert isinstance(expression, FlameExpression) and len(expression) == 3
    assert crops.shape == (3, 224, 224, 3) and crops.min() >= 0 and crops.max() <= 1
    assert crops.std() > 0.05  # real picture content, not black
    values = expression.values
    assert (values[:, 50:52] >= 0).all() and (values[:, 50:52] <= 1).all() and (values[:, 52] >= 0).all()
    assert values[:, 53:55].abs().max() <= 0.2 + 1e-6
    # the face sits in the middle of the crop, filling 1/1.4 of it
    crop = smirk_crop(images, landmarks)
    points = transform_points(landmarks.pixels(), crop.matrix)
    centre = (points.amin(dim=1) + points.amax(dim=1)) / 2
    extent = (points.amax(dim=1) - points.amin(dim=1)).mean(dim=1)
    assert torch.allclose(centre, torch.full_like(centre, 111.5), atol=1.0)
    assert torch.allclose(extent, torch.full_like(extent, 223 / 1.4), rtol=0.02)


def smirk_reference_crop(picture: np.ndarray, points_px: np.ndarray, scale: float = 1.4, size: int = 224) -> np.ndarray:
    """SMIRK's demo preprocessing written with scikit-image, as SMIRK's own code does it: the landmarks' box,
    a square of int(scale * mean(w, h)) around its centre, 3 corners mapped by a similarity transform
    onto the crop's corner pixels, bilinear warp with black outside."""
    from skimage.transform import estimate_transform, warp

    left, right = points_px[:, 0].min(), points_px[:, 0].max()
    top, bottom = points_px[:, 1].min(), points_px[:, 1].max()
    side = int(scale * (right - left + bottom - top) / 2)
    cx, cy = right - (right - left) / 2, bottom - (bottom - top) / 2
    source = np.array([[cx - side / 2, cy - side / 2], [cx - side / 2, cy + side / 2], [cx + side / 2, cy - side / 2]])
    target = np.array([[0, 0], [0, size - 1], [size - 1, 0]])
    transform = estimate_transform("similarity", source, target)
    return warp(picture, transform.inverse, output_shape=(size, size), order=1, mode="constant", cval=0.0,
                preserve_range=True)


def test_smirk_crop_on_real_landmarks_matches_smirks_own_preprocessing(model, real_faces):
    """Landmarks from the real MediaPipe model; the expected crop from scikit-image (SMIRK's recipe)."""
    landmarks = real_faces.result.landmarks
    expression, crops = encode_expression(model, real_faces.images, landmarks, channel_order="RGB")
    assert len(expression) == 2 and crops.shape == (2, 224, 224, 3)
    for i in range(2):
        points = landmarks.pixels()[i, :, :2].double().numpy()
        expected = smirk_reference_crop(real_faces.images[i].double().numpy(), points)
        np.testing.assert_allclose(crops[i].numpy(), expected, atol=1e-4)
    # the test data's mesh of the same faces (an independent MediaPipe run) fills the middle 1/1.4 of the crop
    crop = smirk_crop(real_faces.images, landmarks)
    reference = transform_points(torch.from_numpy(real_faces.reference_px), crop.matrix)
    centre = (reference.amin(dim=1) + reference.amax(dim=1)) / 2
    extent = (reference.amax(dim=1) - reference.amin(dim=1)).mean(dim=1)
    assert (centre - 111.5).abs().max() < 4 and (extent / (223 / 1.4) - 1).abs().max() < 0.05
