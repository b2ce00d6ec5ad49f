"""Identity nodes inside a real ComfyUI: Load InsightFace, Face Embed (ArcFace), Load Arc2Face ID Encoder,
Arc2Face ID Conditioning, and the two shipped ID workflows run headless.

Models: a tiny ONNX recogniser and a stand-in SCRFD detector (``onnx_face_models``: it reports the boxes of three
real faces of insightface's t1.jpg, and nothing in an all-black picture) under
``insightface/models/antelopev2``; the full-size official-format Arc2Face encoder folder, UNet, VAE
and Expression Adapter from ``official_files``. Nothing is downloaded: the download option runs
against a local stand-in for the hub.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.downloads import ARC2FACE_REPO
from encoders.identity import DETECTOR_FILE
from support.local_hub import UNREACHABLE, Server, hub_tree
from support.official_files import ID_ENCODER_DIR, UNET_FILE, official_models_dir
from support.onnx_face_models import (
    DET_SIZE,
    export_detector,
    export_recognizer,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.large_memory,
              pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")]

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
UNET_NAME = UNET_FILE.removeprefix("diffusion_models/")  # the name in the UNETLoader list


@pytest.fixture(scope="module")
def face_models(tmp_path_factory, t1):
    """A models folder in ComfyUI's layout: insightface/models/antelopev2/{scrfd_10g_bnkps.onnx, arcface.onnx}."""
    rgb, boxes, kps = t1
    root = tmp_path_factory.mktemp("face_models")
    folder = root / "insightface" / "models" / "antelopev2"
    folder.mkdir(parents=True)
    export_recognizer(folder / "arcface.onnx")
    export_detector(folder / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2], blank_sees_nothing=True)
    return root


@pytest.fixture(scope="module")
def nodes(comfy):
    return comfy.pack.nodes.identity_nodes


def use_folders(patch, name: str, *paths) -> None:
    """Make ComfyUI's registered model folder ``name`` exactly ``paths`` (undone by ``patch``)."""
    import folder_paths

    extensions = folder_paths.folder_names_and_paths[name][1]
    patch.setitem(folder_paths.folder_names_and_paths, name, ([str(path) for path in paths], extensions))


def outputs(node_output) -> tuple:
    return node_output.args


@pytest.fixture(scope="module")
def analyzer(nodes, face_models):
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "insightface", face_models / "insightface")
        [analyzer] = outputs(nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=False))
    return analyzer


@pytest.fixture(scope="module")
def id_encoder(nodes):
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "arc2face", official_models_dir() / "arc2face")
        [encoder] = outputs(nodes.LoadArc2FaceIDEncoder.execute(encoder_name="encoder", download_missing=False))
    return encoder


def image_tensor(*images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)


def embed(nodes, analyzer, image, face_index=0, average=False, outlier_distance=0.5):
    return outputs(nodes.FaceEmbed.execute(face_analyzer=analyzer, image=image, face_index=face_index, average=average,
                                           outlier_distance=outlier_distance))


def test_load_insightface_finds_the_antelopev2_folder(analyzer, face_models):
    folder = face_models / "insightface" / "models" / "antelopev2"
    assert analyzer.detector_path == folder / DETECTOR_FILE and analyzer.recognizer_path == folder / "arcface.onnx"
    assert analyzer.det_size == DET_SIZE and analyzer.providers == ["CPUExecutionProvider"]


def test_face_embed_gives_normalised_rows_crops_and_averages(nodes, analyzer, t1):
    rgb, boxes, _ = t1
    image = image_tensor(rgb, (rgb * 0.8).astype(np.uint8))
    embeddings, crops = embed(nodes, analyzer, image)
    assert embeddings.shape == (2, 512) and embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
    assert crops.shape == (2, 112, 112, 3) and crops.dtype == torch.float32 and 0 <= crops.min() < crops.max() <= 1
    assert float(embeddings[0] @ embeddings[1]) < 1 - 1e-4  # the darker copy reaches the recogniser

    second, _ = embed(nodes, analyzer, image[:1], face_index=1)
    assert float(second[0] @ embeddings[0]) < 0.999  # another face, another identity

    averaged, average_crops = embed(nodes, analyzer, image, average=True, outlier_distance=2.0)
    mean = embeddings.mean(0)
    assert averaged.shape == (1, 512) and average_crops.shape == (2, 112, 112, 3)
    torch.testing.assert_close(averaged[0], mean / mean.norm())


def test_no_face_in_image_k_names_k_and_the_detection_size(comfy, nodes, analyzer, t1):
    rgb, _, _ = t1
    FaceNotFoundError = comfy.pack.encoders.identity.FaceNotFoundError  # the pack's module, as ComfyUI loaded it
    with pytest.raises(FaceNotFoundError, match=rf"No face found in image 2 of 2 \(detection size {DET_SIZE}x{DET_SIZE}"):
        embed(nodes, analyzer, image_tensor(rgb, np.zeros_like(rgb)))
    with pytest.raises(FaceNotFoundError, match=r"Image 1: face_index 3 asked for, but 3 face\(s\) were found"):
        embed(nodes, analyzer, image_tensor(rgb), face_index=3)


def test_id_conditioning_shapes_identity_and_negative(nodes, analyzer, id_encoder, t1):
    rgb, _, _ = t1
    first, _ = embed(nodes, analyzer, image_tensor(rgb), face_index=0)
    second, _ = embed(nodes, analyzer, image_tensor(rgb), face_index=1)
    [[positive_a, options_a]], [[negative_a, _]] = outputs(nodes.Arc2FaceIDConditioning.execute(id_encoder=id_encoder, embeddings=first))
    [[positive_b, _]], [[negative_b, _]] = outputs(nodes.Arc2FaceIDConditioning.execute(id_encoder=id_encoder, embeddings=second))
    assert positive_a.shape == negative_a.shape == (1, 77, 768) and positive_a.dtype == torch.float32
    assert options_a == {} and torch.isfinite(positive_a).all()
    # The identity enters at the "id" token of "<start> photo of a id person": attention is causal,
    # so the positions before it are the same for both people and every later one differs.
    position = id_encoder.encoder.id_position
    assert position == 4
    torch.testing.assert_close(positive_a[:, :position], positive_b[:, :position], rtol=0, atol=1e-5)
    assert bool(((positive_a - positive_b)[0, position:].abs().amax(dim=-1) > 1e-4).all())
    # The negative is the encoder on "", whoever the person is.
    torch.testing.assert_close(negative_a, negative_b, rtol=0, atol=0)
    assert (negative_a - positive_a).abs().max() > 1e-3
    # one row per embedding; the negative follows the batch
    [[positive_ab, _]], [[negative_ab, _]] = outputs(
        nodes.Arc2FaceIDConditioning.execute(id_encoder=id_encoder, embeddings=torch.cat([first, second])))
    assert positive_ab.shape == negative_ab.shape == (2, 77, 768)
    torch.testing.assert_close(positive_ab[1], positive_b[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(negative_ab[1], negative_a[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"zero or not finite in batch row 1 \(counting from 1\)"):
        nodes.Arc2FaceIDConditioning.execute(id_encoder=id_encoder, embeddings=torch.full((1, 512), float("nan")))


def call_core_node(comfy, name, **inputs) -> tuple:
    """A core node through its FUNCTION, whichever node API (V1 class or V3 ComfyNode) this ComfyUI gives it."""
    if name not in comfy.nodes.NODE_CLASS_MAPPINGS:  # comfy_extras nodes load with ComfyUI's extra nodes
        asyncio.run(comfy.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    node_class = comfy.nodes.NODE_CLASS_MAPPINGS[name]
    result = getattr(node_class(), node_class.FUNCTION)(**inputs)
    return tuple(getattr(result, "args", result))


def release_comfy_models() -> None:
    """The full-size UNet out of this process: ComfyUI keeps loaded models until told otherwise."""
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()


def test_core_unet_loader_loads_the_arc2face_unet_and_sampler_custom_takes_the_conditioning(comfy, nodes, analyzer, id_encoder, t1):
    """Arc2Face's published UNet file is a diffusers SD1.5 UNet: ComfyUI's own Load Diffusion Model node
    reads it as SD1.5 with 768-wide cross-attention, and SamplerCustom samples with our conditioning."""
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "diffusion_models", official_models_dir() / "diffusion_models")
        [model] = call_core_node(comfy, "UNETLoader", unet_name=UNET_NAME, weight_dtype="default")
    config = model.model.model_config
    assert type(config).__name__ == "SD15"
    assert config.unet_config["context_dim"] == 768 and config.unet_config["in_channels"] == 4

    [sampler] = call_core_node(comfy, "KSamplerSelect", sampler_name="dpmpp_2m")
    [sigmas] = call_core_node(comfy, "BasicScheduler", model=model, scheduler="normal", steps=1, denoise=1.0)
    rgb, _, _ = t1
    results = []
    for face_index in (0, 1):
        embeddings, _ = embed(nodes, analyzer, image_tensor(rgb), face_index=face_index)
        positive, negative = outputs(nodes.Arc2FaceIDConditioning.execute(id_encoder=id_encoder, embeddings=embeddings))
        latent, _ = call_core_node(comfy, "SamplerCustom", model=model, add_noise=True, noise_seed=3, cfg=3.0,
                                   positive=positive, negative=negative, sampler=sampler, sigmas=sigmas,
                                   latent_image={"samples": torch.zeros(1, 4, 8, 8)})
        results.append(latent["samples"])
    assert results[0].shape == (1, 4, 8, 8) and torch.isfinite(results[0]).all()
    assert (results[0] - results[1]).abs().max() > 1e-4  # the identity reaches the UNet
    del model, config
    release_comfy_models()


def test_missing_insightface_files_name_the_folder_and_files(nodes, tmp_path, monkeypatch):
    use_folders(monkeypatch, "insightface", tmp_path / "insightface")
    with pytest.raises(FileNotFoundError) as error:
        nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=False)
    message = str(error.value)
    for text in (str(tmp_path / "insightface" / "models" / "antelopev2"), "does not exist", DETECTOR_FILE,
                 "arcface.onnx or glintr100.onnx", "antelopev2.zip", "download_missing"):
        assert text in message, text


def test_download_missing_fetches_arcface_onnx_from_the_hub_and_says_where_the_rest_goes(nodes, tmp_path, monkeypatch, face_models):
    source = face_models / "insightface" / "models" / "antelopev2"
    folder = tmp_path / "insightface" / "models" / "antelopev2"
    use_folders(monkeypatch, "insightface", tmp_path / "insightface")
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    # nothing there and offline: the detector (only inside antelopev2.zip) and arcface.onnx (its URL), each with its path
    with pytest.raises(FileNotFoundError) as error:
        nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=True)
    message = str(error.value)
    assert f"{UNREACHABLE}/{ARC2FACE_REPO}/resolve/main/arcface.onnx\n    -> {folder / 'arcface.onnx'}" in message
    assert "antelopev2.zip" in message and f"-> {folder / DETECTOR_FILE}" in message

    # the detector in place: arcface.onnx comes from the (local) hub and is used
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DETECTOR_FILE).write_bytes((source / DETECTOR_FILE).read_bytes())
    with Server(hub_tree(tmp_path / "hub", {"arcface.onnx": (source / "arcface.onnx").read_bytes()})) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        [analyzer] = outputs(nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=True))
        assert server.requests == [f"/{ARC2FACE_REPO}/resolve/main/arcface.onnx"]
    assert analyzer.recognizer_path == folder / "arcface.onnx"
    assert (folder / "arcface.onnx").read_bytes() == (source / "arcface.onnx").read_bytes()


def write_encoder_folder(folder: Path, config: dict, weights: str | None = "pytorch_model.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / weights).write_bytes(b"")
    return folder


def test_encoder_folders_are_listed_and_missing_files_named(nodes, tmp_path, monkeypatch):
    use_folders(monkeypatch, "arc2face", tmp_path / "arc2face")
    options = nodes.LoadArc2FaceIDEncoder.GET_SCHEMA().inputs[0].options
    assert options == ["encoder"]  # nothing there yet: the published name, whose error says what to put where
    with pytest.raises(FileNotFoundError) as error:
        nodes.LoadArc2FaceIDEncoder.execute(encoder_name="encoder", download_missing=False)
    message = str(error.value)
    for text in (str(tmp_path / "arc2face" / "encoder"), "config.json and pytorch_model.bin or model.safetensors",
                 "FoivosPar/Arc2Face", "download_missing"):
        assert text in message, text

    write_encoder_folder(tmp_path / "arc2face" / "encoder", {"model_type": "clip_text_model"}, weights=None)
    write_encoder_folder(tmp_path / "arc2face" / "mine" / "fp16", {"model_type": "clip_text_model"}, "model.safetensors")
    write_encoder_folder(tmp_path / "arc2face" / "unet", {"_class_name": "UNet2DConditionModel"}, "diffusion_pytorch_model.safetensors")
    # the published name stays listed (incomplete here), so that choosing it says what is missing
    assert nodes.LoadArc2FaceIDEncoder.GET_SCHEMA().inputs[0].options == ["encoder", "mine/fp16"]
    assert nodes.LoadArc2FaceIDEncoder.GET_SCHEMA().inputs[0].default == "mine/fp16"
    with pytest.raises(FileNotFoundError, match=r"encoder is missing pytorch_model.bin or model.safetensors: it must hold"):
        nodes.LoadArc2FaceIDEncoder.execute(encoder_name="encoder", download_missing=False)

    # a folder of another architecture: the loader names the file and what it expected
    write_encoder_folder(tmp_path / "arc2face" / "encoder", {"model_type": "unet"})
    with pytest.raises(ValueError, match=r"encoder/config.json is not a CLIP text-encoder config.*Arc2Face ID"):
        nodes.LoadArc2FaceIDEncoder.execute(encoder_name="encoder", download_missing=False)


def test_encoder_download_offline_says_which_file_goes_where(nodes, tmp_path, monkeypatch):
    use_folders(monkeypatch, "arc2face", tmp_path / "arc2face")
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    with pytest.raises(FileNotFoundError) as error:
        nodes.LoadArc2FaceIDEncoder.execute(encoder_name="encoder", download_missing=True)
    message = str(error.value)
    folder = tmp_path / "arc2face" / "encoder"
    for name in ("config.json", "pytorch_model.bin"):
        assert f"{UNREACHABLE}/{ARC2FACE_REPO}/resolve/main/encoder/{name}\n    -> {folder / name}" in message
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_loaded_encoder_fits_comfyui_devices(comfy, id_encoder):
    import comfy.model_management as model_management

    assert id_encoder.load_device == model_management.text_encoder_device()
    assert id_encoder.offload_device == model_management.text_encoder_offload_device()
    parameter = next(id_encoder.encoder.text_model.parameters())
    assert parameter.device == id_encoder.offload_device
    # on the CPU the encoder runs in float32 (ComfyUI's fp16 text-encoder default is for GPUs)
    assert parameter.dtype == (torch.float32 if id_encoder.load_device.type == "cpu" else torch.float16)
    assert Path(id_encoder.folder) == official_models_dir() / ID_ENCODER_DIR


def test_reference_faces_are_aligned_to_portraits_and_faceless_references_named(comfy, analyzer, t1):
    rgb, boxes, kps = t1
    face_align = comfy.pack.encoders.face_align
    portraits = face_align.aligned_portraits(analyzer, image_tensor(rgb), 512)
    largest = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    expected = face_align.align_portrait(rgb, kps[largest], 512)
    assert portraits.shape == (1, 512, 512, 3)
    assert np.array_equal((portraits[0].numpy() * 255).round().astype(np.uint8), expected)
    with pytest.raises(comfy.pack.encoders.identity.FaceNotFoundError, match="No face found in image 2 of 2"):
        face_align.aligned_portraits(analyzer, image_tensor(rgb, np.zeros_like(rgb)), 512)
