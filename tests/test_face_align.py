"""One face alignment for training data and the Reference Adapter node: FFHQ's quad procedure.

The expected quad is computed here by hand from the 68-point landmarks of real faces of t1.jpg,
as FFHQ's alignment (and Arc2Face's ``image_align``) does: eye centres are the means of points
36-41 and 42-47, the mouth corners are points 48 and 54.
"""

from pathlib import Path

import numpy as np
import pytest

from encoders.face_align import align_face, align_portrait, ffhq_quad, portrait_matrix

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


def t1_faces():
    if not (TESTDATA / "t1_faces.npz").exists():
        pytest.skip(f"shared test data not found at {TESTDATA}")
    import insightface
    from PIL import Image

    picture = np.asarray(Image.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB"))
    data = np.load(TESTDATA / "t1_faces.npz")
    return picture, data["kps5"], data["lm68"]


def quad_by_hand(lm68: np.ndarray) -> np.ndarray:
    """FFHQ's oriented square: corners top-left, bottom-left, bottom-right, top-right."""
    eye_left, eye_right = lm68[36:42].mean(0), lm68[42:48].mean(0)
    mouth_left, mouth_right = lm68[48], lm68[54]
    eye_centre = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) / 2 - eye_centre
    # x: the eye-to-eye direction, tilted by the eye-to-mouth direction turned a quarter
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    half_side = max(2.0 * np.linalg.norm(eye_to_eye), 1.8 * np.linalg.norm(eye_to_mouth))
    x = x / np.linalg.norm(x) * half_side
    y = np.array([-x[1], x[0]])
    centre = eye_centre + 0.1 * eye_to_mouth
    return np.array([centre - x - y, centre - x + y, centre + x + y, centre + x - y])


def test_the_quad_from_five_keypoints_is_ffhqs_quad_from_68_landmarks():
    _, kps5, lm68 = t1_faces()
    for points, landmarks in zip(kps5, lm68):
        np.testing.assert_allclose(ffhq_quad(points), quad_by_hand(landmarks.astype(np.float64)), atol=1e-3)


def test_the_crop_maps_the_quad_onto_the_output_square():
    picture, kps5, lm68 = t1_faces()
    size = 512
    for points, landmarks in zip(kps5, lm68):
        quad = quad_by_hand(landmarks.astype(np.float64))
        crop, matrix = align_face(picture, points, size)
        moved = quad @ matrix[:, :2].T + matrix[:, 2]
        # PIL's QUAD transform (FFHQ) maps the quad's corners to the output's outer pixel edges:
        # in pixel-centre coordinates those are -0.5 and size - 0.5
        corners = np.array([[0, 0], [0, size], [size, size], [size, 0]]) - 0.5
        np.testing.assert_allclose(moved, corners, atol=0.05)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8 and crop.std() > 10
        # the crop's pixel at the quad's centre is the picture's pixel there
        centre = quad.mean(0)
        u, v = centre @ matrix[:, :2].T + matrix[:, 2]
        assert abs(u - (size - 1) / 2) < 0.05 and abs(v - (size - 1) / 2) < 0.05
    np.testing.assert_array_equal(align_portrait(picture, kps5[0], size), align_face(picture, kps5[0], size)[0])
    np.testing.assert_allclose(portrait_matrix(kps5[0], size), align_face(picture, kps5[0], size)[1])


def test_training_and_the_reference_node_share_the_function():
    import training.annotate as annotate
    from encoders import face_align

    assert annotate.align_face is face_align.align_face


def test_a_large_face_is_shrunk_first_and_still_lands_on_the_quad():
    picture, kps5, lm68 = t1_faces()
    enlarged = np.kron(picture, np.ones((3, 3, 1), dtype=np.uint8))  # every face 3x larger
    # pixel centres scale about -0.5: a centre at p lands at 3p + 1
    crop, matrix = align_face(enlarged, kps5[0] * 3 + 1, 64)
    quad = quad_by_hand(lm68[0].astype(np.float64) * 3 + 1)
    moved = quad @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(moved, np.array([[0, 0], [0, 64], [64, 64], [64, 0]]) - 0.5, atol=0.05)
    small = align_face(picture, kps5[0], 64)[0].astype(np.float32)
    assert crop.shape == (64, 64, 3) and np.abs(crop.astype(np.float32) - small).mean() < 8


def test_degenerate_keypoints_are_refused():
    with pytest.raises(ValueError, match="cannot align a face"):
        ffhq_quad(np.zeros((5, 2)))
