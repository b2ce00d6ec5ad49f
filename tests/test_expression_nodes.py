"""Expression nodes inside a real ComfyUI: loaders, extraction (SMIRK, MediaPipe, EmoNet), condition images,
editors, animation, presets, charts; and FLAME Expression Editor -> Expression Interpolate -> Apply Expression
Adapter executed by ComfyUI's PromptExecutor.

Models: a SMIRK-shaped encoder with random weights saved as SMIRK_em1.pt in the published layout, a narrow
EmoNet saved as emonet_8.pth (DataParallel ``module.`` keys), and for the graph run the full-size
official-format Arc2Face files of ``official_files``. MediaPipe is Google's real face_landmarker.task (fixture
``mediapipe_task``); the face analyzer's detector is a stand-in that reports the test data's t1.jpg faces
(``../shared/testdata/t1_faces.npz``, whose MediaPipe mesh the landmarks are checked against).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from support.headless import run_workflow
from support.official_files import official_models_dir
from workflows import run

pytestmark = [pytest.mark.comfyui, pytest.mark.large_memory]
TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


def outputs(node_output) -> tuple:
    return node_output.args


def use_folders(patch, name: str, *paths) -> None:
    """Make ComfyUI's registered model folder ``name`` exactly ``paths`` (undone by ``patch``)."""
    import folder_paths

    extensions = folder_paths.folder_names_and_paths[name][1]
    patch.setitem(folder_paths.folder_names_and_paths, name, ([str(path) for path in paths], extensions))
    folder_paths.filename_list_cache.pop(name, None)


@pytest.fixture(scope="module")
def enc(comfy):
    return comfy.pack.nodes.expression_encoder_nodes


@pytest.fixture(scope="module")
def ctl(comfy):
    return comfy.pack.nodes.expression_control_nodes


@pytest.fixture(scope="module")
def lib(comfy):
    """The pack's own ``encoders`` package (values passed into nodes must be its classes)."""
    return comfy.pack.encoders


@pytest.fixture(scope="module")
def t1(lib):
    """insightface's t1.jpg as a 1-image IMAGE batch, and the Landmarks of three of its faces."""
    import cv2

    spec = importlib.util.find_spec("insightface")
    picture = (Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / "t1.jpg"
               if spec is not None and spec.submodule_search_locations else None)
    npz = TESTDATA / "t1_faces.npz"
    if picture is None or not picture.is_file() or not npz.is_file():
        pytest.skip(f"t1.jpg (insightface) or {npz} not available")
    rgb = cv2.imread(str(picture))[..., ::-1].copy()
    image = torch.from_numpy(rgb).float().div(255).unsqueeze(0)
    faces = torch.from_numpy(np.load(npz)["lm478"]).float()
    return image, lib.expressions.Landmarks(faces, image_size=rgb.shape[:2])


@pytest.fixture(scope="module")
def models(tmp_path_factory, lib):
    """smirk/SMIRK_em1.pt and emotion/emonet_8.pth in the published layouts, random weights."""
    root = tmp_path_factory.mktemp("expression_models")
    torch.manual_seed(0)
    smirk = lib.smirk.SmirkExpressionEncoder()
    checkpoint = {lib.smirk.SMIRK_PREFIX + key: value for key, value in smirk.state_dict().items()}
    checkpoint["smirk_encoder.pose_encoder.encoder.conv_stem.weight"] = torch.zeros(16, 3, 3, 3)  # ignored
    checkpoint["smirk_generator.encoder.0.weight"] = torch.zeros(8, 4)
    (root / "smirk").mkdir()
    torch.save(checkpoint, root / "smirk" / "SMIRK_em1.pt")
    emonet = lib.emotion.EmoNet(n_expression=8, stem=8, width=16, fc_hidden=16)
    with torch.no_grad():
        for module in emonet.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_var.uniform_(0.5, 1.5)
    (root / "emotion").mkdir()
    torch.save({f"module.{key}": value for key, value in emonet.state_dict().items()}, root / "emotion" / "emonet_8.pth")
    (root / "mediapipe").mkdir()
    return root


@pytest.fixture
def smirk_model(enc, models, monkeypatch):
    use_folders(monkeypatch, "smirk", models / "smirk")
    return outputs(enc.LoadSmirkEncoder.execute(model_name="SMIRK_em1.pt"))[0]


# --- extraction -------------------------------------------------------------------------------------------

def test_smirk_expression_on_a_real_photo_with_given_landmarks(enc, lib, smirk_model, t1):
    image, landmarks = t1
    expression, crops = outputs(enc.SmirkExpression.execute(image=image, smirk_model=smirk_model, channel_order="BGR",
                                                           face_index=0, landmarks=landmarks))
    assert isinstance(expression, lib.expressions.FlameExpression) and len(expression) == 3  # one row per face
    assert crops.shape == (3, 224, 224, 3) and 0 <= crops.min() and crops.max() <= 1 and crops.std() > 0.05
    values = expression.values
    assert ((values[:, 50:52] >= 0) & (values[:, 50:52] <= 1)).all() and (values[:, 52] >= 0).all()
    assert values[:, 53:].abs().max() <= 0.2 + 1e-6
    rgb, _ = outputs(enc.SmirkExpression.execute(image=image, smirk_model=smirk_model, channel_order="RGB",
                                                 face_index=0, landmarks=landmarks))
    assert not torch.allclose(rgb.values, values)
    with pytest.raises(ValueError, match="connect 'landmarks'.*or a 'face_landmarker'"):
        enc.SmirkExpression.execute(image=image, smirk_model=smirk_model, channel_order="RGB", face_index=0)


def test_missing_model_files_name_the_folder_the_file_and_where_to_get_it(enc, models, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    for folder in ("smirk", "mediapipe", "emotion"):
        use_folders(monkeypatch, folder, empty / folder)
    schema = enc.LoadFaceLandmarker.define_schema()
    assert schema.inputs[0].options == ["face_landmarker.task"]  # offered even when absent, so the error can guide
    with pytest.raises(FileNotFoundError) as error:
        enc.LoadFaceLandmarker.execute(model_name="face_landmarker.task", max_faces=4, min_confidence=0.5)
    message = str(error.value)
    assert "'face_landmarker.task'" in message and str(empty / "mediapipe") in message
    assert "https://storage.googleapis.com/mediapipe-models/face_landmarker/" in message
    with pytest.raises(FileNotFoundError, match=r"'SMIRK_em1\.pt'.*smirk.*github\.com/georgeretsi/smirk"):
        enc.LoadSmirkEncoder.execute(model_name=enc.LoadSmirkEncoder.define_schema().inputs[0].options[0])
    with pytest.raises(FileNotFoundError, match=r"'emonet_8\.pth'.*emotion.*github\.com/face-analysis/emonet"):
        enc.LoadEmoNet.execute(model_name="emonet_8.pth")


@pytest.fixture
def face_landmarker(enc, monkeypatch, mediapipe_task):
    """Load MediaPipe Face Landmarker on Google's real face_landmarker.task."""
    use_folders(monkeypatch, "mediapipe", mediapipe_task.parent)
    [landmarker] = outputs(enc.LoadFaceLandmarker.execute(model_name="face_landmarker.task", max_faces=4,
                                                          min_confidence=0.5))
    yield landmarker
    landmarker.close()  # MediaPipe's task would otherwise be closed at interpreter exit, noisily


@pytest.fixture(scope="module")
def face_analyzer(lib, tmp_path_factory, t1):
    """The pack's FaceAnalyzer on stand-in models: the SCRFD-shaped stand-in detector of ``onnx_face_models``
    reports the test data's three t1.jpg faces (nothing in a black picture), through insightface's decoding."""
    from support.onnx_face_models import export_detector, export_recognizer

    image, _ = t1
    faces = np.load(TESTDATA / "t1_faces.npz")
    folder = tmp_path_factory.mktemp("stand_in_face_models")
    export_detector(folder / "det.onnx", faces["boxes"], faces["kps5"], [0.9, 0.9, 0.9], tuple(image.shape[1:3]),
                    blank_sees_nothing=True)
    export_recognizer(folder / "rec.onnx")
    return lib.identity.FaceAnalyzer(folder / "rec.onnx", folder / "det.onnx", provider="cpu")


def test_face_landmarks_node_on_a_group_photo_retries_around_the_analyzers_faces(enc, lib, face_landmarker,
                                                                                face_analyzer, t1):
    image, faces = t1
    pixels = faces.pixels()
    largest = int(((pixels.amax(1) - pixels.amin(1)).prod(-1)).argmax())
    run_node = dict(face_landmarker=face_landmarker, face_index=0, running_mode="image", fps=30.0)
    # MediaPipe's short-range detector alone finds none of t1.jpg's small faces, and says what to do
    with pytest.raises(ValueError, match=r"no face found in image 1 of the batch.*Connect a face analyzer \(Load InsightFace\)"):
        enc.FaceLandmarksNode.execute(image=image, on_missing="error", **run_node)
    batch = torch.cat([image, torch.zeros_like(image)])  # the second image has no face
    with pytest.raises(ValueError, match=r"no face found in image 2 of the batch \(counting from 1\).*also retried on crops"):
        enc.FaceLandmarksNode.execute(image=batch, on_missing="error", face_analyzer=face_analyzer, **run_node)
    landmarks, blendshapes, preview = outputs(enc.FaceLandmarksNode.execute(
        image=batch, on_missing="previous", face_analyzer=face_analyzer, **run_node))
    assert isinstance(landmarks, lib.expressions.Landmarks) and landmarks.image_size == tuple(image.shape[1:3])
    errors = (landmarks.pixels()[0, :, :2] - pixels[largest, :, :2]).norm(dim=-1)  # vs the test data's mesh
    assert errors.median() < 4.0 and errors.mean() < 4.5
    assert torch.equal(landmarks.values[1], landmarks.values[0])
    assert isinstance(blendshapes, lib.expressions.ArkitBlendshapes) and blendshapes.values.shape == (2, 52)
    assert 0 <= blendshapes.values.min() and blendshapes.values.max() <= 1 and blendshapes.values.max() > 0.3
    assert preview.shape == batch.shape and (preview[0] - image[0]).abs().max() > 0.1  # contours drawn over it


def test_smirk_with_a_face_landmarker_crops_where_face_landmarks_finds_the_face(enc, face_landmarker, smirk_model, t1):
    image, faces = t1
    pixels = faces.pixels()[0, :, :2]
    (x0, y0), (x1, y1) = (pixels.amin(0) - 60).int().tolist(), (pixels.amax(0) + 60).int().tolist()
    face = image[:, y0:y1, x0:x1].contiguous()  # one t1.jpg face, large enough for MediaPipe
    expression, crop = outputs(enc.SmirkExpression.execute(image=face, smirk_model=smirk_model, channel_order="RGB",
                                                          face_index=0, face_landmarker=face_landmarker))
    landmarks, _, _ = outputs(enc.FaceLandmarksNode.execute(image=face, face_landmarker=face_landmarker, face_index=0,
                                                            running_mode="image", fps=30.0, on_missing="error"))
    given, given_crop = outputs(enc.SmirkExpression.execute(image=face, smirk_model=smirk_model, channel_order="RGB",
                                                            face_index=0, landmarks=landmarks))
    torch.testing.assert_close(expression.values, given.values)
    torch.testing.assert_close(crop, given_crop)
    [overlay] = outputs(enc.LandmarksOverlay.execute(image=image, landmarks=faces, palette="regions", points=True,
                                                     thickness=0))
    assert overlay.shape == image.shape and (overlay - image).abs().amax() > 0.1


def test_landmark_image_and_emojidiff_local_image(enc, t1):
    image, faces = t1
    kwargs = dict(landmarks=faces, width=256, height=192, fit="face", face_scale=1.6, palette="regions", thickness=0,
                  regions="face_oval, lips, left_eye", mesh=False, points=False)
    [drawn] = outputs(enc.LandmarkImage.execute(**kwargs))
    assert drawn.shape == (3, 192, 256, 3) and torch.equal(drawn, outputs(enc.LandmarkImage.execute(**kwargs))[0])
    lit = drawn.amax(-1) > 0
    assert 0.002 < lit.float().mean() < 0.2  # lines on black
    colours = {tuple(c) for c in (drawn[lit] * 255).round().int().tolist()}
    assert (21, 101, 192) in colours and (224, 224, 224) in colours and (255, 48, 192) not in colours  # lips, oval; no right eye
    [whole] = outputs(enc.LandmarkImage.execute(**{**kwargs, "fit": "image", "width": 640, "height": 443}))
    assert whole.shape == (3, 443, 640, 3)

    local, mask, photo_mask = outputs(enc.EmojiDiffLocalImage.execute(image=image, landmarks=faces, size=224, mode="parts",
                                                                      dilation=0.04, feather=0.0, margin=1.2, fill=1.0))
    assert local.shape == (3, 224, 224, 3) and mask.shape == (3, 224, 224) and photo_mask.shape == (3, *image.shape[1:3])
    assert 0.05 < mask.mean() < 0.8 and 0 < photo_mask.mean() < 0.05
    removed = mask == 0
    assert torch.allclose(local[removed], torch.ones(1))  # what the mask removes is the fill colour


def test_emonet_loader_and_emotion_from_image(enc, lib, models, monkeypatch, t1):
    use_folders(monkeypatch, "emotion", models / "emotion")
    [emonet] = outputs(enc.LoadEmoNet.execute(model_name="emonet_8.pth"))
    image, faces = t1
    emotion, crops = outputs(enc.EmotionFromImage.execute(image=image, emonet=emonet, crop_scale=1.2, landmarks=faces))
    assert isinstance(emotion, lib.expressions.Emotion) and len(emotion) == 3 and crops.shape == (3, 256, 256, 3)
    torch.testing.assert_close(emotion.probabilities.sum(1), torch.ones(3))
    whole, _ = outputs(enc.EmotionFromImage.execute(image=crops[:1], emonet=emonet, crop_scale=1.2))
    assert len(whole) == 1
    with pytest.raises(ValueError, match=r"a 1x1 image is too small to be a face crop \(at least 32 pixels"):
        enc.EmotionFromImage.execute(image=torch.full((1, 1, 1, 3), 0.5), emonet=emonet, crop_scale=1.2)


# --- editing ------------------------------------------------------------------------------------------------

def flame_controls(ctl, **values) -> dict:
    return {control.name: values.get(control.name, 0.0) for control in ctl.FlameExpressionEditor.CONTROLS}


def test_flame_editor_offsets_sets_clamps_and_rejects_nan(ctl, lib, caplog):
    editor = ctl.FlameExpressionEditor
    [edited] = outputs(editor.execute(mode="offset", **flame_controls(ctl, jaw_open=0.3, eyelid_right=1.0,
                                                                      expression_1=2.0, expression_10=-1.0)))
    expected = torch.zeros(1, 55)
    expected[0, [52, 51, 0, 9]] = torch.tensor([0.3, 1.0, 2.0, -1.0])
    torch.testing.assert_close(edited.values, expected)
    base = lib.expressions.FlameExpression(torch.full((2, 55), 0.1))
    [offset] = outputs(editor.execute(mode="offset", base=base, **flame_controls(ctl, jaw_open=0.2)))
    assert offset.values.shape == (2, 55) and offset.values[:, 52].allclose(torch.tensor(0.3))
    assert offset.values[:, 20].allclose(torch.tensor(0.1))  # components without a slider keep the base
    [replaced] = outputs(editor.execute(mode="set", base=base, **flame_controls(ctl, jaw_open=0.2)))
    assert replaced.values[:, 52].allclose(torch.tensor(0.2)) and replaced.values[:, 0].abs().max() == 0
    with caplog.at_level(logging.WARNING):
        [clamped] = outputs(editor.execute(mode="set", **flame_controls(ctl, jaw_open=-0.4, expression_3=5.0)))
    assert clamped.values[0, 52] == 0 and clamped.values[0, 2] == 3.0
    assert "jaw_open" in caplog.text and "clamped" in caplog.text
    jaw = next(i for i in editor.define_schema().inputs if i.id == "jaw_open")
    assert jaw.min < 0 and jaw.max == 0.5  # the slider reaches past the range only to allow offsets
    with pytest.raises(ValueError, match="jaw_open must be a finite number"):
        editor.execute(mode="offset", **flame_controls(ctl, jaw_open=math.nan))


def test_arkit_editor_and_manual_emotion(ctl, lib, caplog):
    names = ctl.ArkitBlendshapeEditor.NAMES
    assert len(names) == 51 and "_neutral" not in names
    # -0.5 is inside the slider (which offsets too) but not a score: "set" clamps it to 0, with a warning
    scores = dict.fromkeys(names, 0.0) | {"jawOpen": 0.6, "mouthSmileLeft": -0.5}
    with caplog.at_level(logging.WARNING):
        [shapes] = outputs(ctl.ArkitBlendshapeEditor.execute(mode="set", **scores))
    assert "mouthSmileLeft" in caplog.text
    index = lib.expressions.ArkitBlendshapes.index
    assert shapes.values[0, index("jawOpen")] == pytest.approx(0.6) and shapes.values[0, index("mouthSmileLeft")] == 0.0
    with pytest.raises(ValueError, match="mouthSmileLeft must lie between -1 and 1; got 1.5"):  # beyond the slider
        ctl.ArkitBlendshapeEditor.execute(mode="set", **dict(scores, mouthSmileLeft=1.5))
    [more] = outputs(ctl.ArkitBlendshapeEditor.execute(mode="offset", base=shapes, **dict(scores, mouthSmileLeft=0.0,
                                                                                          jawOpen=-0.2)))
    assert more.values[0, index("jawOpen")] == pytest.approx(0.4)

    emotion_node = ctl.ManualEmotion
    [happy] = outputs(emotion_node.execute(mode="class", emotion="Happy", intensity=0.8, valence=0.0, arousal=0.0))
    assert happy.dominant() == ["Happy"] and happy.values[0, 3] == pytest.approx(0.8) and happy.valence[0] > 0
    [point] = outputs(emotion_node.execute(mode="valence_arousal", emotion="Happy", intensity=1.0, valence=-0.6,
                                           arousal=-0.3))
    assert point.dominant() == ["Sad"] and point.valence[0] == pytest.approx(-0.6)
    [both] = outputs(emotion_node.execute(mode="class_with_valence_arousal", emotion="Anger", intensity=1.0,
                                          valence=-0.2, arousal=0.9))
    assert both.dominant() == ["Anger"] and both.arousal[0] == pytest.approx(0.9)


def test_neutralize_each_kind(ctl, lib):
    nodes = {cls.kind.key: cls for cls in ctl.NODES if getattr(cls, "op", "") == "Neutralize"}
    assert set(nodes) == {"FLAME", "ARKit", "Emotion"}
    expression = lib.expressions.FlameExpression(torch.full((1, 55), 0.1))
    [jaw_only] = outputs(nodes["FLAME"].execute(expression=expression, amount=1.0, components=False, eyelids=False, jaw=True))
    assert jaw_only.values[0, 52:].abs().max() == 0 and jaw_only.values[0, :52].allclose(torch.tensor(0.1))
    [half] = outputs(nodes["FLAME"].execute(expression=expression, amount=0.5, components=True, eyelids=True, jaw=True))
    assert half.values.allclose(torch.tensor(0.05))
    shapes = lib.expressions.ArkitBlendshapes(torch.full((2, 52), 0.5))
    assert outputs(nodes["ARKit"].execute(blendshapes=shapes, amount=1.0))[0].values.abs().max() == 0
    [calm] = outputs(nodes["Emotion"].execute(emotion=lib.emotion.emotion_from_class("Fear"), amount=1.0))
    assert calm.dominant() == ["Neutral"] and calm.valence[0] == 0


def per_kind(ctl, op: str) -> dict:
    return {cls.kind.key: cls for cls in ctl.NODES if getattr(cls, "op", "") == op}


def test_interpolate_keyframes_batch_and_smooth(ctl, lib, t1):
    interpolate, keyframes, batch, smooth = (per_kind(ctl, op) for op in ("Interpolate", "Keyframes", "Batch", "Smooth"))
    assert set(interpolate) == set(keyframes) == set(batch) == set(smooth) == {"FLAME", "ARKit", "Emotion", "Landmarks"}
    Flame = lib.expressions.FlameExpression
    start, end = Flame.neutral(), Flame(torch.full((1, 55), 0.2))
    [frames] = outputs(interpolate["FLAME"].execute(start=start, end=end, frames=5, easing="ease_in_out"))
    assert len(frames) == 5 and torch.equal(frames.values[0], start.values[0]) and torch.equal(frames.values[-1], end.values[0])
    assert frames.values[2].allclose(torch.tensor(0.1)) and frames.values[1, 0] < 0.05  # smoothstep: slow start
    with pytest.raises(TypeError, match="cannot interpolate"):
        interpolate["FLAME"].execute(start=start, end=lib.expressions.Emotion.neutral(), frames=3, easing="linear")

    [rows] = outputs(batch["FLAME"].execute(first=start, second=end, third=start))
    assert len(rows) == 3
    [sequence] = outputs(keyframes["FLAME"].execute(keyframes=rows, frames="0, 4, 8", length=10, easing="linear"))
    assert len(sequence) == 10 and sequence.values[4].allclose(torch.tensor(0.2)) and sequence.values[2].allclose(torch.tensor(0.1))
    assert torch.equal(sequence.values[9], start.values[0])  # held after the last keyframe
    with pytest.raises(ValueError, match="2 frame numbers for 3 keyframe rows"):
        keyframes["FLAME"].execute(keyframes=rows, frames="0, 4", length=10, easing="linear")

    generator = torch.Generator().manual_seed(0)
    noisy = Flame(torch.linspace(0, 1, 30).unsqueeze(1).expand(30, 55) + 0.2 * torch.randn(30, 55, generator=generator))
    for method in ("ema", "moving_average", "savgol"):
        [smoothed] = outputs(smooth["FLAME"].execute(expression=noisy, method=method, strength=0.6, window=7, order=2))
        assert smoothed.values.diff(dim=0).abs().mean() < 0.6 * noisy.values.diff(dim=0).abs().mean(), method

    _, faces = t1
    first, last = faces.row(0), faces.row(1)
    [moving] = outputs(interpolate["Landmarks"].execute(start=first, end=last, frames=4, easing="linear"))
    assert len(moving) == 4 and moving.image_size == faces.image_size
    [steady] = outputs(smooth["Landmarks"].execute(landmarks=moving, method="moving_average", strength=0.5, window=3, order=2))
    assert isinstance(steady, lib.expressions.Landmarks) and len(steady) == 4


def test_presets_round_trip_in_the_user_folder(ctl, lib, monkeypatch, tmp_path):
    import folder_paths

    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path))
    load = per_kind(ctl, "LoadPreset")
    assert set(load) == {"FLAME", "ARKit", "Emotion"}
    value = lib.expressions.FlameExpression(torch.linspace(-1, 1, 110).reshape(2, 55))
    ctl.SavePreset.execute(value=value, name="my smile", overwrite=True)
    path = tmp_path / "expression_adapters" / "presets" / "flame_expression" / "my smile.json"
    assert json.loads(path.read_text())["kind"] == "flame_expression"
    options = load["FLAME"].define_schema().inputs[0].options
    assert "my smile" in options and "mouth_open" in options  # the user's presets after the built-in ones
    [loaded] = outputs(load["FLAME"].execute(preset="my smile"))
    torch.testing.assert_close(loaded.values, value.values)
    assert outputs(load["FLAME"].execute(preset="mouth_open"))[0].values[0, 52] > 0
    first = load["FLAME"].fingerprint_inputs(preset="my smile")
    assert isinstance(first, float) and load["FLAME"].fingerprint_inputs(preset="mouth_open") == "mouth_open"

    # through ComfyUI's executor: the preset node's input takes any of the three kinds
    prompt = {"1": {"class_type": "ExpressionAdaptersFlameExpressionEditor",
                    "inputs": {"mode": "offset", **flame_controls(ctl, jaw_open=0.1)}},
              "2": {"class_type": "ExpressionAdaptersSavePreset", "inputs": {"value": ["1", 0], "name": "from graph",
                                                                             "overwrite": True}}}
    assert "from graph.json" in run.execute(prompt)["2"]["text"][0]
    assert outputs(load["FLAME"].execute(preset="from graph"))[0].values[0, 52] == pytest.approx(0.1)

    emotion = lib.emotion.emotion_from_class("Surprise", 0.7)
    ctl.SavePreset.execute(value=emotion, name="wow", overwrite=True)
    torch.testing.assert_close(outputs(load["Emotion"].execute(preset="wow"))[0].values, emotion.values)
    with pytest.raises(FileExistsError):
        ctl.SavePreset.execute(value=emotion, name="wow", overwrite=False)
    with pytest.raises(ValueError, match="invalid preset name"):
        ctl.SavePreset.execute(value=emotion, name="../escape", overwrite=True)
    with pytest.raises(TypeError, match="FLAME expression, blendshapes or an emotion"):
        ctl.SavePreset.execute(value=lib.expressions.Landmarks(torch.zeros(478, 3)), name="x", overwrite=True)

    wrong = path.parent / "not flame.json"
    wrong.write_text((path.parent.parent / "emotion" / "wow.json").read_text())
    with pytest.raises(ValueError, match=r"got a preset of kind 'emotion'\. Expected a JSON list of 55 numbers"):
        load["FLAME"].execute(preset="not flame")
    short = path.parent / "short.json"
    short.write_text(json.dumps({"kind": "flame_expression", "values": [0.0] * 54}))
    with pytest.raises(ValueError, match=r"shape \(batch, 55\)"):
        load["FLAME"].execute(preset="short")
    path.write_text(json.dumps({"kind": "flame_expression", "values": [math.nan] * 55}))  # json writes NaN
    with pytest.raises(ValueError, match="NaN"):
        load["FLAME"].execute(preset="my smile")


def test_charts(ctl, lib):
    shapes = lib.expressions.ArkitBlendshapes(torch.rand(2, 52))
    [chart] = outputs(ctl.BlendshapeChart.execute(blendshapes=shapes, width=512))
    assert chart.shape[0] == 2 and chart.shape[2] == 512 and chart.shape[3] == 3 and chart.std() > 0
    [chart] = outputs(ctl.FlameChart.execute(expression=lib.expressions.FlameExpression(torch.randn(3, 55)), width=600,
                                             height=200, limit=0.0))
    assert chart.shape == (3, 200, 600, 3)
    [chart] = outputs(ctl.EmotionChart.execute(emotion=lib.emotion.emotion_from_class("Happy"), width=400, height=200))
    assert chart.shape == (1, 200, 400, 3)


def test_every_expression_node_is_categorised_and_described(comfy, enc, ctl):
    for node in [*enc.NODES, *ctl.NODES]:
        schema = node.GET_SCHEMA()
        assert schema.node_id in comfy.nodes.NODE_CLASS_MAPPINGS, schema.node_id
        assert schema.category.startswith("expression_adapters/") and schema.description, schema.node_id


# --- a graph through ComfyUI's executor --------------------------------------------------------------------

def test_editor_interpolate_apply_adapter_graph_gives_frames_that_move(comfy, ctl, tmp_path):
    """FLAME Expression Editor x2 -> Expression Interpolate (3 frames) -> Apply Expression Adapter on the
    official-format Arc2Face files; every frame shares one noise (LatentBatchSeedBehavior fixed), so the
    frames differ only by their expressions. Run by workflows/run.py in a process of its own (full-size models)."""
    from safetensors.torch import load_file
    # Two non-neutral ends: the random projection (bias-free MLP + LayerNorm) nearly ignores the length of
    # its input, so a path from neutral (zeros) would look like its end from the first step on.
    start = flame_controls(ctl, expression_1=2.0, jaw_open=0.3)
    end = flame_controls(ctl, expression_2=-2.0, expression_3=1.5, eyelid_left=1.0)
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "arc2face/diffusion_pytorch_model.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "arc2face/pytorch_model.bin", "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sd-vae-ft-mse/diffusion_pytorch_model.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "photo of a person", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "ExpressionAdaptersLoadExpressionAdapter", "inputs": {"adapter_name": "exp_adapter.bin"}},
        "7": {"class_type": "ExpressionAdaptersFlameExpressionEditor", "inputs": {"mode": "offset", **start}},
        "8": {"class_type": "ExpressionAdaptersFlameExpressionEditor", "inputs": {"mode": "offset", **end}},
        "9": {"class_type": "ExpressionAdaptersInterpolateFLAME",
              "inputs": {"start": ["7", 0], "end": ["8", 0], "frames": 3, "easing": "linear"}},
        "10": {"class_type": "ExpressionAdaptersApplyExpressionAdapter",
               "inputs": {"model": ["1", 0], "expression_adapter": ["6", 0], "expression": ["9", 0],
                          "strength": 1.0, "start_at": 0.0, "end_at": 1.0}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "12": {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["11", 0], "seed_behavior": "fixed"}},
        "13": {"class_type": "KSampler",
               "inputs": {"model": ["10", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["12", 0],
                          "seed": 7, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "frames"}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["3", 0]}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "frames"}},
    }
    [images] = run_workflow(comfy.path, prompt, tmp_path, models=[official_models_dir()])

    [saved] = (tmp_path / "output").glob("*.latent")
    latents = load_file(str(saved))["latent_tensor"].float()
    assert latents.shape == (3, 4, 8, 8) and torch.isfinite(latents).all()
    a, b, c = latents
    ends = (a - c).norm()
    assert ends > 0 and (a - b).norm() > 0 and (b - c).norm() > 0  # every frame differs from the others
    assert (a - b).norm() < ends and (b - c).norm() < ends  # the middle frame lies between the ends
    assert 0 < float((b - a).flatten() @ (c - a).flatten()) / float(ends**2) < 1
    assert len(images) == 3
    from PIL import Image

    pixels = [np.asarray(Image.open(path)).astype(int) for path in images]
    assert all(image.shape == (64, 64, 3) for image in pixels)
    assert all(np.abs(pixels[i] - pixels[j]).max() > 0 for i, j in ((0, 1), (1, 2), (0, 2)))
