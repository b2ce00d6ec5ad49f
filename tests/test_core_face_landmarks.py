"""Core ComfyUI's ``FACE_LANDMARKS`` (its "Detect Face Landmarks (MediaPipe)" node, 0.38+) read by our nodes.

The core dicts here are built the way core documents them from the real MediaPipe model's own output
(``mediapipe.tasks`` called directly on two real t1.jpg faces, fixture ``mediapipe_task``): landmarks in
pixels, 3D landmarks in a crop frame of their own (scaled, turned in-plane, shifted), blendshapes by name.
Both routes, core's dict and our Face Landmarks, must give the same tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encoders.core_face_landmarks import (
    as_blendshapes,
    as_landmarks,
    read_core_face_landmarks,
    similarity_scale,
)
from encoders.face_landmarks import FaceLandmarker, NoFaceFound
from support.real_faces import detect_t1_faces

CROP_UNITS = 192.0  # core's landmarks_3d unit: the landmark model's crop side
TURN = 0.3  # radians: the crop frame is turned against the picture, as MediaPipe's rotated face crop is


def rotation(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def core_face(points, categories, matrix, height: int, width: int) -> dict:
    """One face in core's format from MediaPipe's NormalizedLandmarks (x, y in image fractions, z in widths)."""
    normalised = np.array([[p.x, p.y, p.z] for p in points])
    xy = normalised[:, :2] * [width, height]
    depth_px = normalised[:, 2] * width
    face_px = xy[:, 0].max() - xy[:, 0].min()
    scale = CROP_UNITS / face_px
    crop_xy = (xy - xy.mean(0)) @ rotation(TURN) * scale + CROP_UNITS / 2
    return {
        "landmarks_xy": xy.astype(np.float32),
        "landmarks_3d": np.column_stack([crop_xy, depth_px * scale]).astype(np.float32),
        "blendshapes": {c.category_name: float(c.score) for c in categories},
        "bbox_xyxy": np.array([*xy.min(0), *xy.max(0)], dtype=np.float32),
        "score": 0.9,
        "presence": 1.0,
        "transformation_matrix": np.asarray(matrix, dtype=np.float32).reshape(4, 4),
    }


@pytest.fixture(scope="module")
def two_faces(mediapipe_task):
    """One 256 x 512 picture holding two real faces (the right one made smaller), and core's dict for it."""
    detected = detect_t1_faces(mediapipe_task)
    if detected is None:
        pytest.skip("shared test data t1_faces.npz not found")
    left = detected.images[0]
    right = torch.nn.functional.interpolate(detected.images[1].permute(2, 0, 1)[None], size=(200, 200),
                                            mode="bilinear", antialias=True)[0].permute(1, 2, 0)
    picture = torch.ones(256, 512, 3) * 0.5
    picture[:, :256] = left
    picture[28:228, 284:484] = right
    picture = picture.unsqueeze(0)
    core = detect_core_faces(picture, mediapipe_task)
    assert len(core["frames"][0]) == 2
    return picture, core


def detect_core_faces(picture: torch.Tensor, task_path) -> dict:
    """Core's FACE_LANDMARKS for a one-image batch, from the real model's own output (up to two faces)."""
    import mediapipe as mp
    from mediapipe.tasks.python import vision

    options = vision.FaceLandmarkerOptions(base_options=mp.tasks.BaseOptions(model_asset_path=str(task_path)),
                                           num_faces=2, output_face_blendshapes=True,
                                           output_facial_transformation_matrixes=True)
    frame = (picture[0] * 255).round().to(torch.uint8).numpy()
    with vision.FaceLandmarker.create_from_options(options) as task:
        result = task.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame)))
    height, width = frame.shape[:2]
    faces = [core_face(*parts, height, width) for parts in zip(result.face_landmarks, result.face_blendshapes,
                                                                result.facial_transformation_matrixes)]
    return {"frames": [faces], "image_size": (height, width), "connection_sets": {}}


def test_similarity_scale_is_the_scale_of_a_turned_scaled_shifted_copy():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # scale 2.5, turned 40 degrees, shifted: the fit finds 2.5 (and 1 / 2.5 backwards)
    moved = square @ rotation(math.radians(40)).T * 2.5 + [7.0, -3.0]
    assert similarity_scale(square, moved) == pytest.approx(2.5, rel=1e-12)
    assert similarity_scale(moved, square) == pytest.approx(0.4, rel=1e-12)
    with pytest.raises(ValueError, match="one place"):
        similarity_scale(np.zeros((4, 2)), moved)


def test_core_dict_gives_what_our_face_landmarks_gives_for_each_face(two_faces, mediapipe_task):
    picture, core = two_faces
    with FaceLandmarker(mediapipe_task) as landmarker:
        for face_index in (0, 1):
            ours = landmarker.detect(picture, face_index=face_index)
            theirs = read_core_face_landmarks(core, face_index=face_index)
            assert theirs.landmarks.image_size == ours.landmarks.image_size == (256, 512)
            torch.testing.assert_close(theirs.landmarks.values, ours.landmarks.values, atol=2e-6, rtol=1e-4)
            torch.testing.assert_close(theirs.blendshapes.values, ours.blendshapes.values, atol=1e-6, rtol=0)
            torch.testing.assert_close(theirs.matrices, ours.matrices)
    # the left face is the larger: face 0, as our node numbers faces
    assert read_core_face_landmarks(core, 0).landmarks.values[0, :, 0].max() < 0.5
    assert read_core_face_landmarks(core, 1).landmarks.values[0, :, 0].min() > 0.5
    assert torch.equal(as_landmarks(core).values, read_core_face_landmarks(core).landmarks.values)
    assert torch.equal(as_blendshapes(core).values, read_core_face_landmarks(core).blendshapes.values)


def test_frames_without_the_face_and_malformed_faces_are_refused_by_name(two_faces):
    _, core = two_faces
    faces = core["frames"][0]
    video = {**core, "frames": [faces, [], faces[:1], faces]}
    with pytest.raises(NoFaceFound, match=r"no face 0 .* frame\(s\) \[2\] .*of 4.*on_missing = previous"):
        read_core_face_landmarks(video)
    with pytest.raises(NoFaceFound, match=r"no face 1 .* frame\(s\) \[2, 3\]"):
        read_core_face_landmarks(video, face_index=1)
    mesh_without_irises = {**faces[0], "landmarks_xy": faces[0]["landmarks_xy"][:468]}
    with pytest.raises(ValueError, match=r"'landmarks_xy' of frame 1 has shape \(468, 2\); expected \(478, 2\)"):
        read_core_face_landmarks({**core, "frames": [[mesh_without_irises]]})
    with pytest.raises(ValueError, match="unknown blendshape name 'smile'"):
        read_core_face_landmarks({**core, "frames": [[{**faces[0], "blendshapes": {"smile": 1.0}}]]})
    with pytest.raises(ValueError, match="image_size must be"):
        read_core_face_landmarks({**core, "image_size": (0, 512)})


# --- in ComfyUI: socket types and the nodes that take landmarks or blendshapes ------------------------------

def socket_types(node_class) -> tuple[list[tuple[str, str]], list[str]]:
    """(input name, type) pairs and output types of a node, as ComfyUI's validation reads them."""
    declared = node_class.INPUT_TYPES()
    inputs = [(name, spec[0]) for group in ("required", "optional") for name, spec in declared.get(group, {}).items()
              if isinstance(spec[0], str)]
    return inputs, list(node_class.RETURN_TYPES)


@pytest.mark.comfyui
def test_our_socket_types_are_prefixed_and_landmark_inputs_take_cores(comfy):
    from comfy_execution.validation import validate_node_input

    mappings = comfy.nodes.NODE_CLASS_MAPPINGS
    ours = {key: cls for key, cls in mappings.items() if key.startswith("ExpressionAdapters")}
    core_types = {t for key, cls in mappings.items() if key not in ours
                  for t in [spec for _, spec in socket_types(cls)[0]] + socket_types(cls)[1]}
    our_types = {t.strip() for cls in ours.values() for _, spec in socket_types(cls)[0] for t in spec.split(",")}
    our_types |= {t for cls in ours.values() for t in socket_types(cls)[1]}
    custom = our_types - core_types
    assert "EXPR_FACE_LANDMARKS" in custom and "EXPR_ARKIT_BLENDSHAPES" in custom
    assert {t for t in custom if not t.startswith("EXPR_")} == {"FACE_LANDMARKS"}, "only core's own landmarks type"
    landmark_inputs = [(key, name, spec) for key, cls in ours.items() for name, spec in socket_types(cls)[0]
                       if ("EXPR_FACE_LANDMARKS" in spec or "EXPR_ARKIT_BLENDSHAPES" in spec)
                       and key != "ExpressionAdaptersSavePreset"]  # saves our FLAME, blendshape or emotion values
    assert len(landmark_inputs) == 25  # 6 encoder and pose inputs, 2 blendshape inputs, 17 per-kind inputs
    for key, name, spec in landmark_inputs:
        assert validate_node_input("FACE_LANDMARKS", spec), (key, name)  # core's output links to ours
    # ours never links to core's input of that name (0.38's Visualize / Draw Face Mask nodes)
    assert not validate_node_input("EXPR_FACE_LANDMARKS", "FACE_LANDMARKS")


@pytest.mark.comfyui
def test_nodes_given_cores_dict_give_what_they_give_for_ours(comfy, two_faces):
    enc, ctl = comfy.pack.nodes.expression_encoder_nodes, comfy.pack.nodes.facecrafter_nodes
    control = comfy.pack.nodes.expression_control_nodes
    picture, core = two_faces
    reader = comfy.pack.encoders.core_face_landmarks.read_core_face_landmarks
    landmarks, blendshapes = reader(core).landmarks, reader(core).blendshapes
    # the pack's own classes (ComfyUI loaded the pack under its own module name)
    assert type(landmarks).__module__.endswith("encoders.expressions")

    def same(node, key: str, ours, **inputs):
        """The node's outputs for core's dict under ``key`` equal its outputs for our value."""
        for theirs, mine in zip(node.execute(**inputs, **{key: core}).args, node.execute(**inputs, **{key: ours}).args):
            if isinstance(theirs, torch.Tensor):
                assert torch.equal(theirs, mine), node
            elif isinstance(theirs, str):
                assert theirs == mine, node
            else:  # an expression value
                assert torch.equal(theirs.values, mine.values), node
                assert getattr(theirs, "image_size", None) == getattr(mine, "image_size", None), node

    same(enc.LandmarkImage, "landmarks", landmarks, width=128, height=128, fit="face", face_scale=1.6, palette="regions",
         thickness=0, regions="face_oval, lips", mesh=False, points=False)
    same(enc.LandmarksOverlay, "landmarks", landmarks, image=picture, palette="regions", points=True, thickness=0)
    same(ctl.LandmarkPoseEditor, "landmarks", landmarks, yaw=20.0, pitch=0.0, roll=5.0, scale=1.0, shift_x=0.0, shift_y=0.0,
         frames=1, yaw_end=0.0, pitch_end=0.0, roll_end=0.0)
    same(enc.EmojiDiffLocalImage, "landmarks", landmarks, image=picture, size=224, mode="parts", dilation=0.04,
         feather=0.0, margin=1.2, fill=1.0)
    same(control.BlendshapeChart, "blendshapes", blendshapes, width=256)
    same(control.ArkitBlendshapeEditor, "base", blendshapes, mode="offset",
         **{name: 0.0 for name in control.ArkitBlendshapeEditor.NAMES})
    interpolate = next(node for node in control.NODES
                       if issubclass(node, control.Interpolate) and node.kind is control.LANDMARKS)
    frames = interpolate.execute(start=core, end=landmarks, frames=3, easing="linear").args[0]
    assert torch.equal(frames.values, landmarks.values.repeat(3, 1, 1))


@pytest.mark.comfyui
def test_expression_scores_from_cores_faces_equal_the_face_landmarkers(comfy, two_faces, mediapipe_task):
    scores = comfy.pack.nodes.e_adapter_nodes.ExpressionScores
    picture, core = two_faces
    # the reference is the picture; the generated batch its mirror image (other scores than 0) and a grey
    # frame without a face
    mirrored = picture.flip(2)
    generated = torch.cat([mirrored, torch.full_like(picture, 0.5)])
    generated_faces = {**core, "frames": [detect_core_faces(mirrored, mediapipe_task)["frames"][0], []]}
    with FaceLandmarker(mediapipe_task) as landmarker:
        for face_index in (0, 1):
            ours = scores.execute(reference=picture, generated=generated, face_index=face_index,
                                  face_landmarker=landmarker).args
            theirs = scores.execute(reference=picture, generated=generated, face_index=face_index,
                                    reference_faces=core, generated_faces=generated_faces).args
            assert min(ours[:3]) > 0.001 and theirs[:3] == pytest.approx(ours[:3], rel=1e-5)
            assert "image 2: no face" in theirs[3] and "image 2: no face" in ours[3]
    with pytest.raises(ValueError, match=r"generated_faces were found on 1 frames .* the generated images are 2"):
        scores.execute(reference=picture, generated=generated, face_index=0, reference_faces=core, generated_faces=core)
    with pytest.raises(ValueError, match="connect a face_landmarker, or reference_faces"):
        scores.execute(reference=picture, generated=generated, face_index=0, generated_faces=generated_faces)
