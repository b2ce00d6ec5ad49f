from pathlib import Path

import numpy as np
import pytest

from encoders.face_align import FFHQ_FIVE_POINTS, align_portrait, portrait_matrix

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


def t1_faces():
    if not (TESTDATA / "t1_faces.npz").exists():
        pytest.skip(f"shared test data not found at {TESTDATA}")
    import insightface
    from PIL import Image

    picture = np.asarray(Image.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB"))
    return picture, np.load(TESTDATA / "t1_faces.npz")["kps5"]


def test_real_faces_land_on_the_ffhq_framing():
    picture, keypoints = t1_faces()
    for points in keypoints:
        matrix = portrait_matrix(points, 512)
        moved = points @ matrix[:, :2].T + matrix[:, 2]
        # 5 real points never fit a template exactly (two of t1's heads are turned): the misfit stays
        # small and the eyes' midpoint, which sets the framing, stays near the template's
        misfit = np.sqrt(((moved - FFHQ_FIVE_POINTS * 512) ** 2).sum(1).mean())
        assert misfit < 0.06 * 512
        assert np.abs(moved[:2].mean(0) - FFHQ_FIVE_POINTS[:2].mean(0) * 512).max() < 0.04 * 512
    aligned = align_portrait(picture, keypoints[0], 512)
    assert aligned.shape == (512, 512, 3) and aligned.dtype == np.uint8 and aligned.std() > 10
    assert np.array_equal(aligned, align_portrait(picture, keypoints[0], 512))


def test_a_rotated_scaled_shifted_template_is_undone_exactly():
    angle, scale, shift = 0.3, 1.7, np.array([40.0, -12.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (FFHQ_FIVE_POINTS * 256) @ (scale * rotation).T + shift
    matrix = portrait_matrix(points, 256)
    np.testing.assert_allclose(points @ matrix[:, :2].T + matrix[:, 2], FFHQ_FIVE_POINTS * 256, atol=1e-3)
