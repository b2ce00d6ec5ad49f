"""SMIRK crop geometry and the EmojiDiff local image (mask from landmarks)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.expressions import Landmarks
from encoders.face_crops import (
    LOCAL_PARTS,
    crop_matrix,
    emojidiff_local_image,
    landmark_square,
    local_expression_mask,
    smirk_crop,
    to_image_batch,
    transform_points,
)
from support.synthetic_faces import CHEEK, LAYOUT, synthetic_face

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"



def test_smirk_square_geometry_on_synthetic_landmarks():
    # landmarks spanning x 100..300 (w 200) and y 50..210 (h 160) in a 400 x 500 (h x w) image
    points = torch.rand(478, 2) * torch.tensor([200.0, 160.0]) + torch.tensor([100.0, 50.0])
    points[0], points[1] = torch.tensor([100.0, 50.0]), torch.tensor([300.0, 210.0])
    box = landmark_square(points.unsqueeze(0), 1.4)
    assert box.cx.item() == pytest.approx(200.0) and box.cy.item() == pytest.approx(130.0)
    assert box.side.item() == int(1.4 * 180.0) == 251  # SMIRK: int(1.4 * mean(w, h)) in float64
    matrix = crop_matrix(box, 224)
    corners = torch.tensor([[[200 - 125.5, 130 - 125.5], [200 + 125.5, 130 + 125.5]]])
    assert torch.allclose(transform_points(corners, matrix), torch.tensor([[[0.0, 0.0], [223.0, 223.0]]]), atol=1e-4)

    # an image whose red channel is x / W and green channel y / H: the crop samples it linearly
    height, width = 400, 500
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    image = torch.stack([xs / width, ys / height, torch.zeros_like(xs)], dim=-1)
    landmarks = Landmarks.from_pixels(torch.cat([points, torch.zeros(478, 1)], dim=1), (height, width))
    crop = smirk_crop(image, landmarks)
    assert crop.images.shape == (1, 224, 224, 3)
    u = torch.arange(224, dtype=torch.float32)
    expected_x = (200 - 125.5 + u * 251 / 223) / width
    assert torch.allclose(crop.images[0, 100, :, 0], expected_x, atol=1e-4)
    expected_y = (130 - 125.5 + u * 251 / 223) / height
    inside = (130 - 125.5 + u * 251 / 223) >= 0
    assert torch.allclose(crop.images[0, inside, 100, 1], expected_y[inside], atol=1e-4)
    # a face at the left edge: the part of the square left of the picture (x < 0) is black
    shifted = Landmarks.from_pixels(torch.cat([points - torch.tensor([100.0, 0.0]), torch.zeros(478, 1)], dim=1),
                                    (height, width))
    edge = smirk_crop(image, shifted).images[0]
    assert edge[100, :20].abs().max() == 0.0 and edge[100, 30:, 0].min() > 0


def test_to_image_batch_conversions():
    uint8 = np.full((4, 5, 3), 255, dtype=np.uint8)
    batch = to_image_batch(uint8)
    assert batch.shape == (1, 4, 5, 3) and batch.dtype == torch.float32 and batch.max() == 1.0
    assert to_image_batch(torch.rand(2, 4, 5, 4)).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError):
        to_image_batch(torch.rand(4, 5))


def test_local_mask_keeps_parts_and_drops_cheeks_and_background():
    size = 256
    face = synthetic_face()
    points = face[:, :2].numpy() * size
    mask = local_expression_mask(points, size, size)
    assert mask.shape == (size, size) and mask.dtype == np.float32
    assert np.array_equal(mask, local_expression_mask(points, size, size))  # deterministic

    def at(x, y):
        return mask[int(round(y * size)), int(round(x * size))]

    for region in ("right_eye", "left_eye", "right_eyebrow", "left_eyebrow", "nose", "lips"):
        cx, cy = LAYOUT[region][:2]
        assert at(cx, cy) == 1.0, region
    assert at(*CHEEK) == 0.0 and at(1 - CHEEK[0], CHEEK[1]) == 0.0
    assert at(0.5, 0.13) == 0.0  # forehead, near the face contour
    assert at(0.02, 0.02) == 0.0  # background
    # between eye and brow is kept (one hull per eye + brow)
    assert at(0.38, 0.38) == 1.0
    inner = local_expression_mask(points, size, size, mode="inner_face")
    assert inner.sum() > mask.sum() and inner[int(0.52 * size), int(0.44 * size)] == 1.0
    feathered = local_expression_mask(points, size, size, feather=0.02)
    assert 0 < feathered[(feathered > 0) & (feathered < 1)].size
    with pytest.raises(ValueError, match="unknown face part"):
        local_expression_mask(points, size, size, parts=["ears"])
    assert set(LOCAL_PARTS) == {"right_eye", "left_eye", "nose", "mouth"}


def test_local_image_crop_and_fill():
    size = 256
    landmarks = Landmarks(synthetic_face())
    image = torch.full((1, size, size, 3), 0.5)
    black = emojidiff_local_image(image, landmarks)
    white = emojidiff_local_image(image, landmarks, fill=1.0)
    assert black.images.shape == (1, 224, 224, 3) and black.masks.shape == (1, 224, 224)
    assert black.full_masks.shape == (1, size, size)
    kept = black.masks[0] > 0.999
    removed = black.masks[0] < 0.001
    assert kept.any() and removed.any()
    assert torch.allclose(black.images[0][kept], torch.tensor(0.5), atol=1e-3)
    assert black.images[0][removed].abs().max() < 1e-3
    assert torch.allclose(white.images[0][removed], torch.tensor(1.0), atol=1e-3)
    # the crop is centred on the kept parts: both eyes land left/right of centre at similar heights
    eyes = torch.tensor([[LAYOUT["right_eye"][:2], LAYOUT["left_eye"][:2]]]) * size
    placed = transform_points(eyes, black.matrix)[0]
    assert placed[0, 0] < 112 < placed[1, 0] and abs(placed[0, 1] - placed[1, 1]) < 1
    assert torch.equal(emojidiff_local_image(image, landmarks).images, black.images)


def _t1():
    spec = importlib.util.find_spec("insightface")
    npz = TESTDATA / "t1_faces.npz"
    if spec is None or not spec.submodule_search_locations or not npz.is_file():
        pytest.skip("t1 test data not available")
    picture = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / "t1.jpg"
    if not picture.is_file():
        pytest.skip("insightface's t1.jpg not available")
    import cv2

    return cv2.imread(str(picture))[..., ::-1].copy(), np.load(npz)["lm478"]


def test_local_mask_on_real_faces():
    image, faces = _t1()
    height, width = image.shape[:2]
    for face in faces[:2]:  # frontal faces (the third is in profile)
        points = face[:, :2] * [width, height]
        mask = local_expression_mask(points, height, width)

        def at(i, points=points, mask=mask):
            x, y = points[i]
            return mask[int(round(y)), int(round(x))]

        assert at(468) == 1 and at(473) == 1 and at(1) == 1 and at(13) == 1  # irises, nose tip, lips
        assert at(50) == 0 and at(280) == 0  # cheeks
        assert at(234) == 0 and at(454) == 0 and at(152) == 0 and at(10) == 0  # face contour
    local = emojidiff_local_image(image, Landmarks(torch.from_numpy(faces).float()))
    assert local.images.shape == (3, 224, 224, 3) and local.images.std() > 0.05


def test_local_image_on_real_landmarks_from_the_real_model(real_faces):
    """Mask from the real MediaPipe model's landmarks; the checked points from the test data's mesh of the
    same faces (an independent MediaPipe run): inner parts kept, cheeks and the face contour removed."""
    local = emojidiff_local_image(real_faces.images, real_faces.result.landmarks, fill=1.0)
    assert local.images.shape == (2, 224, 224, 3) and local.full_masks.shape == real_faces.images.shape[:3]
    for face in range(2):
        mask, points = local.full_masks[face], real_faces.reference_px[face]

        def at(index, mask=mask, points=points):
            x, y = np.round(points[index]).astype(int)
            return float(mask[y, x])

        assert at(468) == 1 and at(473) == 1 and at(1) == 1 and at(13) == 1  # irises, nose tip, between the lips
        assert at(50) == 0 and at(280) == 0  # cheeks
        assert at(234) == 0 and at(454) == 0 and at(152) == 0 and at(10) == 0  # face contour
    # what the mask keeps is the picture itself; the rest is the fill colour
    kept, removed = local.masks > 0.999, local.masks < 0.001
    assert kept.float().mean() > 0.1 and removed.float().mean() > 0.1
    assert torch.allclose(local.images[removed], torch.ones(1), atol=2e-3)
    assert local.images[kept].std() > 0.05  # real face content, not a flat colour
