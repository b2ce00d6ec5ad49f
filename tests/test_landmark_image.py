"""FaceCrafter landmark image renderer: region tables, colours, determinism, coverage."""


import pytest
import torch

from encoders.expressions import Landmarks
from encoders.face_mesh import REGIONS, region_edges, region_points
from encoders.landmark_image import PALETTES, canvas_points, render_landmark_image
from support.synthetic_faces import LAYOUT, synthetic_face


def test_region_tables_match_mediapipe():
    from mediapipe.tasks.python import vision

    from encoders.face_mesh import MEDIAPIPE_CONNECTION_NAMES

    for region in REGIONS:
        theirs = {(c.start, c.end) for c in getattr(vision.FaceLandmarksConnections, MEDIAPIPE_CONNECTION_NAMES[region])}
        assert set(region_edges(region)) == theirs, region
    assert region_points("right_iris") == [469, 470, 471, 472]
    with pytest.raises(KeyError):
        region_points("ears")


def test_render_is_deterministic_and_colours_regions():
    landmarks = Landmarks(synthetic_face())
    image = render_landmark_image(landmarks, 256, 256)
    again = render_landmark_image(landmarks, 256, 256)
    assert image.shape == (1, 256, 256, 3) and image.dtype == torch.float32
    assert torch.equal(image, again)
    pixels = (image[0] * 255).round().to(torch.int64)
    ys, xs = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    drawn = pixels.sum(dim=-1) > 0
    assert 0.01 < drawn.float().mean() < 0.2  # thin lines on black
    for region, (cx, cy, rx, ry) in LAYOUT.items():
        colour = torch.tensor(PALETTES["regions"][region])
        hit = (pixels == colour).all(dim=-1)
        assert hit.sum() > 5, region
        # every pixel of the region's colour lies near its ellipse (line thickness 1..2 px)
        margin = 3
        assert (xs[hit] >= (cx - rx) * 256 - margin).all() and (xs[hit] <= (cx + rx) * 256 + margin).all(), region
        assert (ys[hit] >= (cy - ry) * 256 - margin).all() and (ys[hit] <= (cy + ry) * 256 + margin).all(), region
    # the eye outline is drawn at its outer corner; the cheek and background stay black
    corner = (int(round(0.42 * 256)), int(round(0.44 * 256)))
    assert (pixels[corner[0] - 2 : corner[0] + 3, corner[1] - 2 : corner[1] + 3] > 0).any()
    assert pixels[int(0.58 * 256), int(0.36 * 256)].sum() == 0
    assert pixels[5, 5].sum() == 0


def test_render_options():
    landmarks = Landmarks(torch.stack([synthetic_face(), synthetic_face()]))
    image = render_landmark_image(landmarks, 128, 192)
    assert image.shape == (2, 128, 192, 3)
    mediapipe_style = render_landmark_image(landmarks, 128, 128, palette="mediapipe")
    colours = {tuple(c) for c in (mediapipe_style[0] * 255).round().to(torch.int64).reshape(-1, 3).tolist()}
    assert (255, 48, 48) in colours and (48, 255, 48) in colours
    with pytest.raises(ValueError, match="unknown palette"):
        render_landmark_image(landmarks, 64, 64, palette="rainbow")
    with pytest.raises(ValueError, match="fit"):
        render_landmark_image(landmarks, 64, 64, fit="stretch")
    only_lips = render_landmark_image(landmarks, 128, 128, regions=["lips"])
    lips = torch.tensor(PALETTES["regions"]["lips"]) / 255
    drawn = only_lips[0].reshape(-1, 3)
    drawn = drawn[drawn.sum(dim=1) > 0]
    assert torch.allclose(drawn, lips.expand_as(drawn), atol=1 / 255)


def test_face_fit_centres_the_face():
    face = synthetic_face()
    face[:, 0] = face[:, 0] * 0.5 + 0.05  # small face in the top-left corner
    face[:, 1] = face[:, 1] * 0.5
    placed = canvas_points(face.unsqueeze(0), 512, 512, fit="face", face_scale=1.5)[0]
    centre = (placed.amin(dim=0) + placed.amax(dim=0)) / 2
    assert torch.allclose(centre, torch.tensor([256.0, 256.0]), atol=0.5)
    extent = (placed.amax(dim=0) - placed.amin(dim=0)).mean()
    assert extent == pytest.approx(512 / 1.5, rel=1e-4)


def test_mesh_option_draws_more():
    landmarks = Landmarks(synthetic_face())
    plain = render_landmark_image(landmarks, 128, 128)
    meshed = render_landmark_image(landmarks, 128, 128, mesh=True)
    assert (meshed.sum(dim=-1) > 0).sum() >= (plain.sum(dim=-1) > 0).sum()


def test_real_landmarks_draw_each_region_where_the_reference_mesh_has_it(real_faces):
    """Landmarks from the real MediaPipe model on two t1.jpg faces; the expected places from the test data's
    mesh of the same faces (an independent MediaPipe run)."""
    size = real_faces.images.shape[1]
    drawn = render_landmark_image(real_faces.result.landmarks, size, size, fit="image")
    assert drawn.shape == (2, size, size, 3)
    pixels = (drawn * 255).round().to(torch.int64)
    for face in range(2):
        for region in REGIONS:
            hit = (pixels[face] == torch.tensor(PALETTES["regions"][region])).all(dim=-1)
            ys, xs = torch.nonzero(hit, as_tuple=True)
            assert len(xs) > 5, (face, region)
            reference = real_faces.reference_px[face, region_points(region)]
            low, high = reference.min(axis=0), reference.max(axis=0)
            tolerance = 6  # a few pixels between the two runs, plus the line's width
            assert abs(xs.min().item() - low[0]) < tolerance and abs(xs.max().item() - high[0]) < tolerance, (face, region)
            assert abs(ys.min().item() - low[1]) < tolerance and abs(ys.max().item() - high[1]) < tolerance, (face, region)
