"""training.upscale (EmojiDiff's SDXL data: IDI shards super-resolved to 1024, the paper with SwinIR) on a tiny
SwinIR built from spandrel's own architecture class, saved as safetensors and loaded back by spandrel's
ModelLoader, as a user's SwinIR file is. The expected pictures come from calling that architecture directly;
the expected latents from diffusers' VAE called directly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from support.training_helpers import write_tiny_vae
from training.shards import ShardWriter, load_index, npy_bytes, read_sample
from training.upscale import main as upscale

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")
SIZE = 32


@pytest.fixture(scope="module")
def swinir(tmp_path_factory):
    """(the architecture, its file): spandrel's SwinIR at a tiny size, x2 with pixel-shuffle upsampling."""
    from safetensors.torch import save_file
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    network = SwinIR(img_size=SIZE, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2.0,
                     upscale=2, upsampler="pixelshuffle").eval()
    path = tmp_path_factory.mktemp("upscale_models") / "tiny_SwinIR_x2.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return network, path


def png(rgb):
    import cv2

    return cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()


def decode(data):
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One IDI-like shard of two samples: 32-pixel crop and reference.png, landmarks, local.jpg, old latents."""
    import cv2
    from skimage import data

    folder = tmp_path_factory.mktemp("idi_shards")
    astronaut = data.astronaut()
    writer = ShardWriter(folder / "shard-000000.tar")
    rng = np.random.default_rng(0)
    for index, (y, x) in enumerate([(0, 120), (40, 160)]):
        crop = cv2.resize(astronaut[y:y + 256, x:x + 256], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        writer.add(f"idi-{index:08d}", {
            "png": png(crop), "json": json.dumps({"key": f"idi-{index:08d}"}).encode(),
            "reference.png": png(crop[::-1].copy()), "local.jpg": cv2.imencode(".jpg", crop)[1].tobytes(),
            "landmarks.npy": npy_bytes(rng.random((478, 3)).astype(np.float32)),
            "latent_mean.npy": npy_bytes(np.zeros((4, 4, 4), np.float16)),
            "latent_std.npy": npy_bytes(np.ones((4, 4, 4), np.float16))}, {"person_id": f"p{index}"})
    writer.close({"items": 2, "skipped": [], "fields": [], "notes": ["IDI triplets"], "vae": None})
    return folder


def swinir_directly(network, rgb) -> np.ndarray:
    """The architecture's own forward on the picture (0..1), clamped, as float H x W x 3."""
    with torch.no_grad():
        out = network(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255)
    return out.clamp(0, 1)[0].permute(1, 2, 0).numpy()


def test_upscaled_shards_hold_the_models_pictures_and_new_latents(swinir, source, tmp_path):
    import cv2
    from diffusers import AutoencoderKL

    network, path = swinir
    vae_folder = write_tiny_vae(tmp_path / "vae")
    out = tmp_path / "up"
    report = upscale([str(source), "--out", str(out), "--model", str(path), "--resolution", str(2 * SIZE),
                      "--vae", str(vae_folder), "--device", "cpu"])
    assert report["samples"] == 2 and (out / "manifest.json").is_file()
    before, after = load_index(source)[0], load_index(out)[0]
    assert [s["person_id"] for s in after["samples"]] == ["p0", "p1"]
    vae = AutoencoderKL.from_pretrained(vae_folder)
    for position in range(2):
        old, new = read_sample(before, position), read_sample(after, position)
        for name in ("png", "reference.png"):
            expected = (swinir_directly(network, decode(old[name])) * 255).round().astype(np.uint8)
            assert decode(new[name]).shape == (2 * SIZE, 2 * SIZE, 3)
            np.testing.assert_array_equal(decode(new[name]), expected)
            # the model ran: a plain resize of the input is another picture
            plain = cv2.resize(decode(old[name]), (2 * SIZE, 2 * SIZE), interpolation=cv2.INTER_CUBIC)
            assert np.abs(plain.astype(int) - expected.astype(int)).mean() > 5
        for name in ("landmarks.npy", "local.jpg", "json"):
            assert new[name] == old[name], name
        crop = torch.from_numpy(decode(new["png"]).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            dist = vae.encode(crop).latent_dist
        mean = np.load(io.BytesIO(new["latent_mean.npy"]))
        assert mean.shape == tuple(dist.mean.shape[1:]) and mean.shape[1] == 2 * SIZE // 8
        np.testing.assert_allclose(mean.astype(np.float32), dist.mean[0].numpy(), atol=2e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vae"]["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert manifest["settings"]["architecture"] == "SwinIR" and manifest["settings"]["scale"] == 2


def test_other_sizes_are_resized_after_the_model_and_old_latents_dropped(swinir, source, tmp_path):
    import cv2

    network, path = swinir
    out = tmp_path / "up48"
    upscale([str(source), "--out", str(out), "--model", str(path), "--resolution", "48", "--device", "cpu"])
    old, new = read_sample(load_index(source)[0], 0), read_sample(load_index(out)[0], 0)
    # the x2 model gives 64; area-resized to 48 by hand here
    expected = cv2.resize(swinir_directly(network, decode(old["png"])), (48, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(decode(new["png"]), (expected * 255).round().clip(0, 255).astype(np.uint8))
    assert not {"latent_mean.npy", "latent_std.npy"} & set(new)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "latent_mean.npy" not in manifest["fields"] and any("latents left out" in n for n in manifest["notes"])
    with pytest.raises(FileNotFoundError, match="SwinIR"):
        upscale([str(source), "--out", str(tmp_path / "x"), "--model", str(tmp_path / "none.pth"), "--device", "cpu"])
