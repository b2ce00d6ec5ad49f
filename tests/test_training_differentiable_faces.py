"""Differentiable pieces of EmojiDiff's ICA losses against code we did not write: onnx2torch's ArcFace vs
onnxruntime, our grid_sample alignment vs scikit-image's similarity estimate and cv2.warpAffine, soft-argmax
on hand-built heatmaps, and diffusers' decoder checkpointing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from support.onnx_face_models import export_recognizer
from training.differentiable_faces import (
    ARCFACE_TEMPLATE,
    arcface_similarity,
    enable_decoder_checkpointing,
    fan_landmarks,
    identity_loss,
    load_torch_recognizer,
    soft_argmax,
    warp_faces,
)

pytest.importorskip("onnx2torch")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_converted_recognizer_matches_onnxruntime_and_passes_gradients(tmp_path):
    import onnxruntime

    path = tmp_path / "w600k_r50.onnx"
    export_recognizer(path, seed=3)
    torch_model = load_torch_recognizer(path)
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    x.requires_grad_(True)
    out = torch_model(x)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in torch_model.parameters())


def known_similarity(scale, degrees, shift):
    c, s = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def test_alignment_matrix_matches_scikit_image():
    from skimage.transform import SimilarityTransform

    template = ARCFACE_TEMPLATE.numpy()
    # keypoints in a picture: the template under a known similarity, then a little noise
    to_picture = known_similarity(2.3, 15, (40, 25))
    kps = template @ to_picture[:, :2].T + to_picture[:, 2] + np.random.default_rng(0).normal(0, 0.8, (5, 2))
    ours = arcface_similarity(torch.from_numpy(kps)[None])[0].numpy()
    reference = SimilarityTransform.from_estimate(kps, template) if hasattr(SimilarityTransform, "from_estimate") else None
    if reference is None:
        reference = SimilarityTransform()
        reference.estimate(kps, template)
    np.testing.assert_allclose(ours, reference.params[:2], atol=1e-8)


def test_grid_sample_warp_matches_cv2_warp_affine():
    import cv2

    height, width = 150, 160
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([np.sin(xs / 9) * np.cos(ys / 13), xs / width, ys / height], -1).astype(np.float32)
    matrix = known_similarity(0.6, -12, (-10, 30))
    expected = cv2.warpAffine(image, matrix, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    ours = warp_faces(torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(matrix)[None], 112)
    ours = ours[0].permute(1, 2, 0).numpy()
    # compare where the source point lies inside the picture with a pixel to spare
    inverse = cv2.invertAffineTransform(matrix)
    u, v = np.meshgrid(np.arange(112), np.arange(112))
    sx, sy = inverse[0, 0] * u + inverse[0, 1] * v + inverse[0, 2], inverse[1, 0] * u + inverse[1, 1] * v + inverse[1, 2]
    inside = (sx > 1) & (sx < width - 2) & (sy > 1) & (sy < height - 2)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], expected[inside], atol=5e-3)  # cv2 rounds coordinates to 1/32 pixel


def test_identity_loss_reaches_the_current_images_only(tmp_path):
    path = tmp_path / "rec.onnx"
    export_recognizer(path, seed=1)
    recognizer = load_torch_recognizer(path)
    generator = torch.Generator().manual_seed(0)
    teacher = (torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1).requires_grad_(True)
    current = (torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1).requires_grad_(True)
    kps = (ARCFACE_TEMPLATE * 1.1 + 4).float()[None]
    loss = identity_loss(recognizer, teacher, current, kps)
    loss.backward()
    assert 0 < float(loss.detach()) < 2 and teacher.grad is None and current.grad.abs().sum() > 0
    assert float(identity_loss(recognizer, current.detach(), current.detach(), kps)) == pytest.approx(0.0, abs=1e-6)


def test_soft_argmax_on_hand_built_heatmaps():
    heatmaps = torch.zeros(1, 2, 8, 10)
    heatmaps[0, 0, 3, 7] = 20.0  # one sharp peak at x = 7, y = 3
    heatmaps[0, 1, 2, 1] = heatmaps[0, 1, 6, 5] = 20.0  # two equal peaks: their midpoint x = 3, y = 4
    points = soft_argmax(heatmaps, beta=5.0)
    torch.testing.assert_close(points, torch.tensor([[[7.0, 3.0], [3.0, 4.0]]]), atol=1e-6, rtol=0)
    flat = soft_argmax(torch.zeros(1, 1, 5, 5))  # uniform: the centre
    torch.testing.assert_close(flat, torch.tensor([[[2.0, 2.0]]]))


def test_fan_landmarks_drop_the_contour_and_pass_gradients():
    from encoders.emotion import EmoNet

    torch.manual_seed(0)
    fan = EmoNet(stem=8, width=16, fc_hidden=16).eval().requires_grad_(False)
    crops = torch.rand(1, 3, 256, 256, requires_grad=True)
    points = fan_landmarks(fan, crops)
    assert points.shape == (1, 51, 2) and bool(((points >= 0) & (points <= 1)).all())
    points.sum().backward()
    assert crops.grad.abs().sum() > 0


def test_decoder_checkpointing_keeps_outputs_and_gradients():
    from training.tiny import tiny_vae

    def decode(checkpointing):
        vae = tiny_vae({"seed": 0})
        if checkpointing:
            enable_decoder_checkpointing(vae)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = vae.decode(latents).sample
        out.square().mean().backward()
        return out.detach(), latents.grad, vae

    plain, plain_grad, _ = decode(False)
    checkpointed, checkpointed_grad, vae = decode(True)
    assert vae.decoder.gradient_checkpointing
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(checkpointed_grad, plain_grad)
