"""FaceCrafter control modules (library, no ComfyUI): sizes, file format, per-row switches, diffusers host, pose editing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.attention import decoupled_attention
from adapters.branches import add_branch
from adapters.checkpoints import AdapterFileError
from adapters.facecrafter import (
    CFG_SWITCHES,
    GUIDANCE_SWITCHES,
    EmotionEncoderConfig,
    FaceCrafter,
    LandmarkEncoderConfig,
    row_alphas,
)
from adapters.layers import SDXL
from adapters.rows import RowLayout
from encoders.expressions import Landmarks
from encoders.landmark_image import blank_rows, render_landmark_image, resize_landmark_images
from encoders.landmark_pose import pose_landmarks, pose_sweep, rotation_matrix
from hosts.diffusers import attach_adapters, facecrafter_kwargs
from support.random_init import init_devices
from support.tiny_facecrafter import TINY_EMO, TINY_LMK, landmark_images, random_facecrafter


def conv(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def test_parameter_counts_follow_the_formula_and_land_near_the_paper():
    crafter = FaceCrafter()
    d = 256
    # the CNN of the spec, counted by hand: six 3x3 convs, one 3x3 conv, 3 residual blocks of
    # (GroupNorm + 3x3 conv) x 2, GroupNorm, 1x1 conv, position embedding, LayerNorm
    cnn = (conv(3, 32, 3) + conv(32, 32, 3) + conv(32, 64, 3) + conv(64, 128, 3) + conv(128, 256, 3) + conv(256, 256, 3)
           + conv(256, 256, 3) + 3 * 2 * (2 * 256 + conv(256, 256, 3)) + 2 * 256 + conv(256, 256, 1) + 256 * 256 + 2 * 256)
    mlp = (10 * 256 + 256) + (256 * 256 + 256) + (256 * 1024 + 1024) + 2 * 256
    counts = crafter.parameter_counts()
    # bias-free K and V on 16 SD1.5 layers: 2 x d x (5 x 320 + 5 x 640 + 6 x 1280) = 24,960 d
    assert counts["lmk"] == 24_960 * d + cnn
    assert counts["emo"] == 24_960 * d + mlp
    assert abs(counts["lmk"] - 11.7e6) < 0.1e6  # paper Table 1: 11.7M
    assert abs(counts["total"] - 18e6) < 0.4e6  # paper Table 1: 18M
    assert len(crafter.lmk.layers) == 16 and crafter.lmk.encoder.config.num_tokens == 256


def test_tokens_have_the_spec_shapes_and_v_starts_at_zero():
    crafter = FaceCrafter(LandmarkEncoderConfig(), EmotionEncoderConfig())
    with torch.no_grad():
        assert crafter.landmark_tokens(torch.rand(1, 3, 512, 512)).shape == (1, 256, 256)
        assert crafter.emotion_tokens(torch.rand(2, 10)).shape == (2, 4, 256)
    for module in crafter.modules_present().values():
        for branch in module.kv.values():
            assert torch.count_nonzero(branch.to_v_ip.weight) == 0
            assert branch.to_k_ip.weight.std() > 0 and branch.to_k_ip.bias is None


def test_token_width_and_module_sizes_are_configurable():
    crafter = FaceCrafter(LandmarkEncoderConfig(image_size=128, token_dim=64), EmotionEncoderConfig(token_dim=64, num_tokens=2),
                          layer_set="up")
    assert len(crafter.lmk.layers) == 9
    assert crafter.lmk.key_value_parameters() == 2 * 64 * (3 * 1280 + 3 * 640 + 3 * 320)
    with torch.no_grad():
        assert crafter.landmark_tokens(torch.rand(1, 3, 128, 128)).shape == (1, 16, 64)


@pytest.mark.parametrize("present", [("lmk", "emo"), ("lmk",), ("emo",)])
def test_file_round_trip_with_either_module_absent(tmp_path, present, monkeypatch):
    crafter = random_facecrafter(lmk="lmk" in present, emo="emo" in present)
    path = tmp_path / "facecrafter.safetensors"
    crafter.save(path)
    initialised = init_devices(monkeypatch)
    loaded = FaceCrafter.from_file(path)
    assert initialised and set(initialised) == {"meta"}  # built as shapes only, every weight from the file
    assert set(loaded.modules_present()) == set(present)
    saved = load_file(path)
    assert {key.split(".")[0] for key in saved} == set(present)
    parameters = dict(loaded.named_parameters())
    assert set(parameters) == set(saved) and not list(loaded.buffers())
    for key, parameter in parameters.items():  # V too, which a built module starts at zero
        assert parameter.device == torch.device("cpu") and parameter.dtype == torch.float32 == saved[key].dtype, key
        assert torch.equal(parameter.detach(), saved[key]), key
    for key, value in crafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["layer_set"] == "all" and json.loads(metadata["landmark_style"])["size"] == 512
    if "lmk" in present:
        assert json.loads(metadata["lmk_config"])["token_dim"] == TINY_LMK.token_dim


def _resave(tmp_path, state, metadata):
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def test_loading_is_strict_and_names_what_did_not_fit(tmp_path):
    crafter = random_facecrafter()
    path = tmp_path / "facecrafter.safetensors"
    crafter.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)

    extra = _resave(tmp_path, state | {"lmk.extra.weight": torch.zeros(1)}, metadata)
    with pytest.raises(AdapterFileError, match=r"lmk section.*unexpected keys: extra.weight"):
        FaceCrafter.from_file(extra)
    missing = _resave(tmp_path, {k: v for k, v in state.items() if k != "emo.encoder.norm.bias"}, metadata)
    with pytest.raises(AdapterFileError, match=r"emo section.*missing keys: encoder.norm.bias"):
        FaceCrafter.from_file(missing)
    wrong = dict(state)
    wrong["emo.encoder.mlp.0.weight"] = torch.zeros(16, 12)
    with pytest.raises(AdapterFileError, match=r"shape mismatch: encoder.mlp.0.weight: file \(16, 12\) vs expected \(16, 10\)"):
        FaceCrafter.from_file(_resave(tmp_path, wrong, metadata))
    with pytest.raises(AdapterFileError, match=r"expected 'lmk' and/or 'emo' sections, found \['image_proj'\]"):
        FaceCrafter.from_file(_resave(tmp_path, state | {"image_proj.proj.weight": torch.zeros(1)}, metadata))
    with pytest.raises(AdapterFileError, match="FaceCrafter is Arc2Face \\(SD1.5\\) only"):
        FaceCrafter.from_file(_resave(tmp_path, state, metadata | {"layout": "SDXL"}))
    with pytest.raises(AdapterFileError, match="FaceCrafter files are .safetensors"):
        FaceCrafter.from_file(tmp_path / "facecrafter.bin")


def test_made_up_metadata_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    """Metadata sizes the modules; a config far larger than the tensors (here 2**14-channel convolutions, about
    22 GB of float32) is compared on the meta device and refused before one weight is allocated."""
    crafter = random_facecrafter()
    path = tmp_path / "facecrafter.safetensors"
    crafter.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["lmk_config"]) | {"channels": [2**14] * 6}
    allocated = []
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: allocated.append(self.weight.device.type))
    with pytest.raises(AdapterFileError, match=r"lmk section\).*shape mismatch"):
        FaceCrafter.from_file(_resave(tmp_path, load_file(path), metadata | {"lmk_config": json.dumps(config)}))
    assert allocated and set(allocated) == {"meta"}  # built, but only as shapes


def test_sdxl_is_refused():
    with pytest.raises(ValueError, match="FaceCrafter is built on Arc2Face, an SD1.5 model; it has no SDXL form"):
        FaceCrafter(layout=SDXL)


@pytest.mark.parametrize("emotion, message", [
    (torch.zeros(1, 8), r"shape \(batch, 10\).*got \(1, 8\)"),
    (torch.zeros(10), r"shape \(batch, 10\).*got \(10,\)"),
    (torch.tensor([[0.0] * 10, [float("nan")] + [0.0] * 9]), "emotion rows 2 have NaN"),
])
def test_bad_emotions_are_refused(emotion, message):
    with pytest.raises(ValueError, match=message):
        random_facecrafter().emotion_tokens(emotion)


def test_row_alphas_follow_the_chunk_indices_in_any_order():
    assert row_alphas(RowLayout(4, [1, 0]), CFG_SWITCHES, module=0, strength=0.5) == [0.0, 0.0, 0.5, 0.5]
    assert row_alphas(RowLayout(4, [3, 2, 1, 0]), GUIDANCE_SWITCHES, module=0) == [0.0, 1.0, 0.0, 0.0]
    assert row_alphas(RowLayout(4, [3, 2, 1, 0]), GUIDANCE_SWITCHES, module=1) == [1.0, 0.0, 0.0, 0.0]
    assert row_alphas(RowLayout(4, [2, 0, 3, 1]), GUIDANCE_SWITCHES, module=1) == [0.0, 0.0, 1.0, 0.0]


def test_add_branch_leaves_rows_with_alpha_zero_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    query, out = torch.randn(4, 16, 32, generator=generator), torch.randn(4, 16, 32, generator=generator)
    key, value = torch.randn(4, 5, 32, generator=generator), torch.randn(4, 5, 32, generator=generator)
    alphas = [0.0, 1.0, 0.0, 0.5]
    result = add_branch(out, query, key, value, 2, alphas)
    assert torch.equal(result[0], out[0]) and torch.equal(result[2], out[2])
    expected = out + decoupled_attention(query, key, value, 2, torch.tensor(alphas))
    torch.testing.assert_close(result, expected)
    assert add_branch(out, query, key, value, 2, [0.0] * 4) is out and add_branch(out, query, key, value, 2, 0.0) is out


def test_landmark_images_are_resized_and_blank_ones_found():
    images = landmark_images(batch=2, size=96)
    chw, resized = resize_landmark_images(images, 64)
    assert resized and chw.shape == (2, 3, 64, 64)
    same, resized = resize_landmark_images(landmark_images(size=64), 64)
    assert not resized and same.shape == (1, 3, 64, 64)
    batch = torch.cat([landmark_images(), torch.zeros(1, 64, 64, 3)])
    assert blank_rows(batch.permute(0, 3, 1, 2)) == [1]
    with pytest.raises(ValueError, match=r"RGB IMAGE batch \(B, H, W, 3\)"):
        resize_landmark_images(torch.zeros(1, 64, 64), 64)


def test_diffusers_host_switches_rows_and_alpha_zero_rows_equal_the_base_model():
    from support.tiny_unets import CONTEXT_DIM, diffusers_unet

    unet = diffusers_unet("SD1.5")
    crafter = random_facecrafter()
    attach_adapters(unet, {"lmk": crafter.lmk, "emo": crafter.emo})
    generator = torch.Generator().manual_seed(3)
    x, context = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 7, CONTEXT_DIM, generator=generator)
    with torch.no_grad():
        lmk = crafter.landmark_tokens(landmark_images(size=64).permute(0, 3, 1, 2)).expand(4, -1, -1)
        emo = crafter.emotion_tokens(torch.rand(1, 10)).expand(4, -1, -1)
        # intra-batch mixed conditioning: ID, ID+LMK, ID+EMO, ID+LMK+EMO
        kwargs = facecrafter_kwargs(crafter, lmk, emo, torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
        mixed = unet(x, 500, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample
        base = unet(x, 500, encoder_hidden_states=context).sample
        lmk_only = unet(x, 500, encoder_hidden_states=context, cross_attention_kwargs=facecrafter_kwargs(crafter, lmk, None, 1.0, 0.0)).sample
    assert torch.equal(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], lmk_only[1])
    assert all((mixed[i] - base[i]).abs().max() > 1e-3 for i in (1, 2, 3))


# -- Landmark Pose Editor maths -------------------------------------------------------------------

def face(seed: int = 0, image_size=(480, 640)) -> Landmarks:
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(1, 478, 3, generator=generator) * torch.tensor([0.3, 0.4, 0.1]) + torch.tensor([0.35, 0.3, -0.05])
    return Landmarks(values, image_size=image_size)


def test_zero_rotation_is_the_identity():
    landmarks = face()
    posed = pose_landmarks(landmarks)
    torch.testing.assert_close(posed.landmarks.values, landmarks.values, atol=1e-6, rtol=0)
    assert posed.outside == [0]
    torch.testing.assert_close(rotation_matrix(0, 0, 0), torch.eye(3, dtype=torch.float64))


def test_yaw_then_minus_yaw_returns_the_input():
    landmarks = face()
    there = pose_landmarks(landmarks, yaw=35.0).landmarks
    assert (there.values - landmarks.values).abs().max() > 1e-2
    back = pose_landmarks(there, yaw=-35.0).landmarks
    torch.testing.assert_close(back.values, landmarks.values, atol=1e-5, rtol=0)


def test_roll_of_90_degrees_maps_x_to_y_by_hand():
    # a 200 x 100 (h x w) frame; every point at the centre (50, 100) px except four 20 px away, placed
    # symmetrically so the centre stays the mean. A 90-degree counter-clockwise roll on screen (y down)
    # takes (dx, dy) to (dy, -dx): right of the centre -> above it, below it -> right of it.
    centre = torch.tensor([50.0, 100.0, 0.0])
    offsets = torch.tensor([[20.0, 0.0, 0.0], [-20.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, -20.0, 0.0]])
    pixels = centre.repeat(478, 1)
    pixels[:4] += offsets
    size = torch.tensor([100.0, 200.0, 100.0])  # x / width, y / height, z / width
    rolled = pose_landmarks(Landmarks((pixels / size)[None], image_size=(200, 100)), roll=90.0).landmarks.values[0]
    expected = torch.tensor([[50.0, 80.0], [50.0, 120.0], [70.0, 100.0], [30.0, 100.0]])
    torch.testing.assert_close(rolled[:4, :2] * size[:2], expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(rolled[4:, :2] * size[:2], centre[:2].expand(474, 2), atol=1e-3, rtol=0)


def test_yaw_moves_the_nearer_points_right_and_keeps_depth_order():
    landmarks = face()
    nearest = int(landmarks.values[0, :, 2].argmin())  # smallest z: nearest the camera (the nose)
    posed = pose_landmarks(landmarks, yaw=20.0).landmarks.values
    centre_x = landmarks.values[0, :, 0].mean()
    assert posed[0, nearest, 0] - centre_x > landmarks.values[0, nearest, 0] - centre_x


def test_points_leaving_the_frame_are_reported_and_the_drawing_stays_in_the_frame():
    landmarks = face(image_size=(64, 64))
    posed = pose_landmarks(landmarks, scale=3.0, shift_x=0.4)
    assert posed.outside[0] > 0 and "image 1:" in posed.report() and "outside the frame" in posed.report()
    image = render_landmark_image(posed.landmarks, 64, 64)
    assert image.shape == (1, 64, 64, 3) and image.max() > 0
    assert pose_landmarks(landmarks).report() == "all points inside the frame"


def test_pose_sweep_goes_from_start_to_end():
    landmarks = face()
    sweep = pose_sweep(landmarks, 5, (-30.0, 0.0, 0.0), (30.0, 0.0, 0.0)).landmarks.values
    assert sweep.shape == (5, 478, 3)
    torch.testing.assert_close(sweep[0], pose_landmarks(landmarks, yaw=-30.0).landmarks.values[0])
    torch.testing.assert_close(sweep[2], landmarks.values[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sweep[4], pose_landmarks(landmarks, yaw=30.0).landmarks.values[0])
    with pytest.raises(ValueError, match="yaw must be a finite number"):
        pose_landmarks(landmarks, yaw=math.nan)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        pose_landmarks(landmarks, scale=0.0)


def test_tiny_configs_fit_the_tiny_unet():
    assert TINY_LMK.num_tokens == 4 and TINY_EMO.num_tokens == 4
