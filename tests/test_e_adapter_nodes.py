"""E-Adapter nodes inside a real ComfyUI: Load/Apply E-Adapter, the recogniser choice of Load InsightFace,
Expression Scores, and the three EmojiDiff workflows validated against ComfyUI's node definitions.

Models: stand-in IP-Adapter files in the published layouts (``e_adapter_standins``) on tiny SD1.5/SDXL
UNets (the SDXL path of the nodes runs on a tiny SDXL-structured model); a tiny ONNX recogniser and a
stand-in detector (``onnx_face_models``); Google's real MediaPipe face landmarker (the ``mediapipe_task`` fixture).
"""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.identity import DETECTOR_FILE
from support.e_adapter_standins import faceid_state, image_state, write_published
from support.onnx_face_models import DET_SIZE, export_detector, export_recognizer, face_crop
from support.two_hosts import Hosts as TwoHosts

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")]
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


@cache
def Hosts(family: str, batch: int):  # noqa: N802 - shared: building the tiny UNets is the slow part
    return TwoHosts(family, batch)


def use_folders(patch, name: str, *paths) -> None:
    import folder_paths

    extensions = folder_paths.folder_names_and_paths.get(name, ([], set(folder_paths.supported_pt_extensions)))[1]
    patch.setitem(folder_paths.folder_names_and_paths, name, ([str(path) for path in paths], extensions))


@pytest.fixture(scope="module")
def nodes(comfy):
    return comfy.pack.nodes.e_adapter_nodes


@pytest.fixture(scope="module")
def ipadapter_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ipadapter")
    write_published(folder, "SD1.5")
    write_published(folder, "SDXL")
    return folder


def load(nodes, ipadapter_folder, family="SDXL", **kwargs):
    suffix = "sd15" if family == "SD1.5" else "sdxl"
    arguments = dict(source="ip_adapter_files", e_adapter_name="none", faceid_name=f"ip-adapter-faceid_{suffix}.bin",
                     image_name="ip-adapter_sd15.bin" if family == "SD1.5" else "ip-adapter_sdxl_vit-h.bin") | kwargs
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "ipadapter", ipadapter_folder)
        return nodes.LoadEAdapter.execute(**arguments).args[0]


def clip_output(image_embeds):
    import comfy.clip_vision

    output = comfy.clip_vision.Output()
    output["image_embeds"] = image_embeds
    return output


def apply_node(nodes, model, adapter, id_embedding=None, image_embeds=None, **kwargs):
    arguments = dict(id_strength=1.0, expression_strength=1.0, expression_layers="auto", start_at=0.0, end_at=1.0,
                     lora_strength=1.0) | kwargs
    clip = clip_output(image_embeds) if image_embeds is not None else None
    return nodes.ApplyEAdapter.execute(model=model, e_adapter=adapter, id_embedding=id_embedding,
                                       expression_clip_vision=clip, **arguments).args[0]


def test_sdxl_path_of_the_nodes_on_a_tiny_sdxl_model(comfy, nodes, ipadapter_folder, tmp_path):
    hosts = Hosts("SDXL", 2)
    adapter = load(nodes, ipadapter_folder)
    assert adapter.layout.name == "SDXL" and len(adapter.lora) == 140 * 4
    identity = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    identity.recognizer = "w600k_r50.onnx"
    clip = torch.randn(1, 1024)
    patched = apply_node(nodes, hosts.model, adapter, identity, clip, lora_strength=0.0)
    direct = comfy.pack.nodes.e_adapter_nodes.apply_e_adapter(hosts.model, adapter, identity, clip, lora_strength=0.0)
    node_out = hosts.comfy(patched, cond_or_uncond=[1, 0])
    torch.testing.assert_close(node_out, hosts.comfy(direct, cond_or_uncond=[1, 0]), atol=1e-6, rtol=1e-6)
    assert (node_out - hosts.comfy(cond_or_uncond=[1, 0])).abs().max() > 1e-2
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert sum(patch.previous is not None for patch in replaced.values()) == 10  # expression stacked on ID: Up 0.1 only

    # our file, saved and loaded back through the node, gives the same model output
    adapter.save(tmp_path / "e_adapter_sdxl.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "expression_adapters", tmp_path)
        ours = nodes.LoadEAdapter.execute(source="e_adapter_file", e_adapter_name="e_adapter_sdxl.safetensors",
                                          faceid_name="none", image_name="none").args[0]
    from_file = apply_node(nodes, hosts.model, ours, identity, clip, lora_strength=0.0)
    torch.testing.assert_close(hosts.comfy(from_file, cond_or_uncond=[1, 0]), node_out, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="expression layers 'all'"):
        apply_node(nodes, hosts.model, ours, identity, clip, expression_layers="all")


def test_apply_node_validates_its_numbers_and_its_files(nodes, ipadapter_folder):
    hosts = Hosts("SDXL", 2)
    adapter = load(nodes, ipadapter_folder)
    for name, value, message in (("id_strength", float("nan"), "must be a finite number between 0 and 3; got nan"),
                                 ("expression_strength", 7.0, "must lie between 0 and 3; got 7"),
                                 ("lora_strength", -1.0, "must lie between 0 and 2; got -1")):
        with pytest.raises(ValueError, match=rf"Apply E-Adapter \(EmojiDiff\): {name} {message}"):
            apply_node(nodes, hosts.model, adapter, torch.randn(1, 512), **{name: value})
    with pytest.raises(ValueError, match="choose the FaceID IP-Adapter file"):
        load(nodes, ipadapter_folder, faceid_name="none")
    with pytest.raises(ValueError, match=r"ip-adapter_sdxl_vit-h.bin .* for SD1.5: it is for SDXL"):
        load(nodes, ipadapter_folder, faceid_name="ip-adapter-faceid_sd15.bin")
    sd15 = load(nodes, ipadapter_folder, "SD1.5")
    with pytest.raises(ValueError, match="made for SD1.5 models, but the model is SDXL"):
        apply_node(nodes, hosts.model, sd15, torch.randn(1, 512))


@pytest.fixture(scope="module")
def face_models(tmp_path_factory, t1):
    """insightface/models/{antelopev2/{detector, arcface.onnx}, buffalo_l/{w600k_r50.onnx, det_10g.onnx}, mypack/...}."""
    rgb, boxes, kps = t1
    root = tmp_path_factory.mktemp("face_models") / "insightface"
    antelopev2, buffalo_l, custom = (root / "models" / name for name in ("antelopev2", "buffalo_l", "mypack"))
    for folder in (antelopev2, buffalo_l, custom):
        folder.mkdir(parents=True)
    export_recognizer(antelopev2 / "arcface.onnx", seed=0)
    export_recognizer(buffalo_l / "w600k_r50.onnx", seed=1)
    export_recognizer(custom / "my_recognizer.onnx", seed=2)
    export_detector(antelopev2 / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2], blank_sees_nothing=True)
    (buffalo_l / "det_10g.onnx").write_bytes((antelopev2 / DETECTOR_FILE).read_bytes())
    return root


def test_load_insightface_recognizer_choice_tags_the_embedding(comfy, face_models, t1, nodes, ipadapter_folder):
    identity_nodes = comfy.pack.nodes.identity_nodes
    rgb = t1[0]
    image = torch.from_numpy(rgb[None].astype(np.float32) / 255.0)
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "insightface", face_models)
        choices = identity_nodes.recognizer_choices()
        assert choices == ["auto", "antelopev2/arcface.onnx", "antelopev2/glintr100.onnx", "buffalo_l/w600k_r50.onnx",
                           "mypack/my_recognizer.onnx"]
        embeddings = {}
        for choice in ("auto", "buffalo_l/w600k_r50.onnx", "mypack/my_recognizer.onnx"):
            [analyzer] = identity_nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=False,
                                                                recognizer=choice).args
            vectors, _ = identity_nodes.FaceEmbed.execute(face_analyzer=analyzer, image=image, face_index=0, average=False,
                                                          outlier_distance=0.5).args
            embeddings[choice] = vectors
        assert analyzer.detector_path.name == DETECTOR_FILE  # antelopev2's detector serves every recogniser
        with pytest.raises(FileNotFoundError, match=r"antelopev2/glintr100.onnx not found .*antelopev2 pack"):
            identity_nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=False,
                                                   recognizer="antelopev2/glintr100.onnx")
    assert embeddings["auto"].recognizer == "arcface.onnx"
    assert embeddings["buffalo_l/w600k_r50.onnx"].recognizer == "w600k_r50.onnx"
    assert not torch.allclose(embeddings["auto"], embeddings["buffalo_l/w600k_r50.onnx"])  # another network, another space

    hosts = Hosts("SD1.5", 2)
    adapter = load(nodes, ipadapter_folder, "SD1.5")
    apply_node(nodes, hosts.model, adapter, embeddings["buffalo_l/w600k_r50.onnx"])
    with pytest.raises(ValueError, match=r"made by arcface.onnx.*set recognizer to buffalo_l/w600k_r50.onnx"):
        apply_node(nodes, hosts.model, adapter, embeddings["auto"])


def test_buffalo_l_alone_uses_its_own_detector(comfy, face_models, tmp_path):
    import shutil

    identity_nodes = comfy.pack.nodes.identity_nodes
    root = tmp_path / "insightface"
    shutil.copytree(face_models / "models" / "buffalo_l", root / "models" / "buffalo_l")
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "insightface", root)
        [analyzer] = identity_nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=False,
                                                            recognizer="buffalo_l/w600k_r50.onnx").args
    assert analyzer.detector_path == root / "models" / "buffalo_l" / "det_10g.onnx"


@pytest.fixture(scope="module")
def landmarker(mediapipe_task):
    from encoders.face_landmarks import FaceLandmarker

    with FaceLandmarker(mediapipe_task, max_faces=2) as model:
        yield model


def test_expression_scores_node(nodes, landmarker, t1):
    from encoders.expression_metrics import exp_score, lms_score

    rgb, boxes, _ = t1
    crops = [face_crop(rgb, box) for box in boxes[:2]]
    batch = torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0)
    reference = batch[:1]
    exp_mean, exp_sum, lms, report, table = nodes.ExpressionScores.execute(
        reference=reference, generated=batch, face_landmarker=landmarker, face_index=0).args
    ref = landmarker.detect(reference)
    gen = landmarker.detect(batch)
    sums = exp_score(ref.blendshapes.values.numpy().repeat(2, 0), gen.blendshapes.values.numpy())
    lmss = lms_score(ref.landmarks.values.numpy().repeat(2, 0), gen.landmarks.values.numpy(), (256, 256), (256, 256))
    assert sums[0] == pytest.approx(0.0, abs=1e-9) and sums[1] > 0.05  # the same face scores 0, another face more
    assert exp_sum == pytest.approx(sums.mean()) and exp_mean == pytest.approx(sums.mean() / 52)
    assert lms == pytest.approx(lmss.mean()) and lmss[1] > 0
    assert "image 1: exp_mean 0.0000" in report and "image 2:" in report and report.splitlines()[-1].startswith("mean:")
    assert table.shape[0] == 1 and table.shape[-1] == 3 and table.std() > 0

    black = torch.zeros(1, 256, 256, 3)
    with pytest.raises(ValueError, match="(?i)no face"):  # the reference is the user's photo: it must have a face
        nodes.ExpressionScores.execute(reference=black, generated=batch, face_landmarker=landmarker, face_index=0)
    # a generated picture without a face (a failed generation) gets no score; the mean is over the others
    exp_mean, exp_sum, lms, report, _ = nodes.ExpressionScores.execute(
        reference=reference, generated=torch.cat([black, batch]), face_landmarker=landmarker, face_index=0).args
    assert exp_sum == pytest.approx(sums.mean()) and lms == pytest.approx(lmss.mean())
    assert "image 1: no face: exp_mean nan" in report and report.splitlines()[-1].startswith("mean of 2 with a face:")
    # none with a face: no NaN score may flow into another node (a call from Python: the prompt is unknown)
    with pytest.raises(ValueError, match="none of the 1 generated images shows a face"):
        nodes.ExpressionScores.execute(reference=reference, generated=black, face_landmarker=landmarker, face_index=0)
    # in a prompt that reads only the report and table (as emojidiff_compare does), the run goes on and says why
    feeds = {"9": {"class_type": "ExpressionAdaptersExpressionScores", "inputs": {}},
             "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 3]}}}
    assert not nodes.scores_feed_other_nodes(SimpleNamespace(prompt=feeds, unique_id="9"))
    assert nodes.scores_feed_other_nodes(SimpleNamespace(prompt=feeds | {"11": {"inputs": {"a": ["9", 2]}}}, unique_id="9"))
    assert nodes.scores_feed_other_nodes(None)
    with pytest.raises(ValueError, match="2 reference images for 3 generated images"):
        nodes.ExpressionScores.execute(reference=batch, generated=torch.cat([batch, reference]), face_landmarker=landmarker,
                                       face_index=0)


WORKFLOW_FILES = {
    "checkpoints": ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"],
    "clip_vision": ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
    "ipadapter": ["ip-adapter-faceid_sd15.bin", "ip-adapter_sd15.bin", "ip-adapter-faceid_sdxl.bin", "ip-adapter_sdxl_vit-h.bin"],
    "diffusion_models": ["arc2face/diffusion_pytorch_model.safetensors"],
    "expression_adapters": ["exp_adapter.bin"],
}


@pytest.mark.parametrize("name", ["emojidiff_sd15", "emojidiff_sdxl", "emojidiff_compare"])
def test_workflow_validates_against_comfyui_node_definitions(comfy, tmp_path, name):
    """ComfyUI's own prompt validation: every node exists, every link fits its socket type, every value its
    widget (combo choices, ranges); model files are empty placeholders with the names the README gives."""
    import json

    import execution
    import folder_paths

    workflow = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    inputs = tmp_path / "input"
    inputs.mkdir()
    for image in ("emojidiff_identity.jpg", "emojidiff_expression.jpg"):
        Image.new("RGB", (64, 64)).save(inputs / image)
    with pytest.MonkeyPatch.context() as patch:
        for folder, files in WORKFLOW_FILES.items():
            for file in files:
                (tmp_path / folder / file).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / folder / file).write_bytes(b"")
            use_folders(patch, folder, tmp_path / folder)
        previous_input = folder_paths.get_input_directory()
        folder_paths.set_input_directory(str(inputs))
        try:
            valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", workflow, None))
        finally:
            folder_paths.set_input_directory(previous_input)
    assert valid, (error, node_errors)
    assert set(outputs) >= {"18"}


def test_the_e_adapter_takes_the_chosen_face_of_a_group_photo(comfy, face_models, t1, nodes, ipadapter_folder):
    """Face Embed's face_index picks the face whose identity the E-Adapter gets: the second-largest face of t1.jpg
    gives the embedding insightface's own ArcFaceONNX computes for that face, and another picture than face 1's."""
    import cv2
    from insightface.app.common import Face
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    identity_nodes = comfy.pack.nodes.identity_nodes
    rgb, boxes, kps = t1
    image = torch.from_numpy(rgb[None].astype(np.float32) / 255.0)
    with pytest.MonkeyPatch.context() as patch:
        use_folders(patch, "insightface", face_models)
        [analyzer] = identity_nodes.LoadInsightFace.execute(provider="cpu", det_size=DET_SIZE, download_missing=False,
                                                            recognizer="buffalo_l/w600k_r50.onnx").args
        chosen = {index: identity_nodes.FaceEmbed.execute(face_analyzer=analyzer, image=image, face_index=index,
                                                          average=False, outlier_distance=0.5).args[0]
                  for index in (0, 1)}
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    second = sorted(range(len(boxes)), key=lambda i: -areas[i])[1]
    recognizer = ArcFaceONNX(str(face_models / "models" / "buffalo_l" / "w600k_r50.onnx"))
    expected = recognizer.get(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), Face(kps=np.asarray(kps[second], dtype=np.float32)))
    expected = torch.from_numpy(expected / np.linalg.norm(expected)).float()
    torch.testing.assert_close(chosen[1][0], expected, atol=1e-4, rtol=1e-4)
    assert chosen[1].recognizer == "w600k_r50.onnx"

    hosts = Hosts("SD1.5", 2)
    adapter = load(nodes, ipadapter_folder, "SD1.5")
    outputs = [hosts.comfy(apply_node(nodes, hosts.model, adapter, chosen[index], lora_strength=0.0), cond_or_uncond=[0, 1])
               for index in (0, 1)]
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4


def test_load_e_adapter_keeps_fp16_published_weights_in_fp16_and_gives_the_same_output(nodes, ipadapter_folder, tmp_path):
    """Published IP-Adapter files are fp16: Load E-Adapter keeps their key/value weights in fp16 (half the
    memory) and the model's output is that of the library's fp32 copy; fp32-only values stay fp32."""
    from adapters.e_adapter import EAdapter

    folder = tmp_path / "ipadapter"
    folder.mkdir()
    for name, state in (("ip-adapter-faceid_sd15.bin", faceid_state("SD1.5")), ("ip-adapter_sd15.bin", image_state("SD1.5"))):
        torch.save({part: {key: value.half() for key, value in weights.items()} for part, weights in state.items()},
                   folder / name)
    compact = load(nodes, folder, "SD1.5")
    full = EAdapter.from_published(folder / "ip-adapter-faceid_sd15.bin", folder / "ip-adapter_sd15.bin").eval()

    def branch_weights(adapter):
        return [p for name, p in adapter.named_parameters() if ".to_k_ip." in name or ".to_v_ip." in name]

    assert {p.dtype for p in branch_weights(compact)} == {torch.float16}
    assert {p.dtype for p in branch_weights(full)} == {torch.float32}
    assert {p.dtype for p in branch_weights(load(nodes, ipadapter_folder, "SD1.5"))} == {torch.float32}  # random fp32 values

    hosts = Hosts("SD1.5", 2)
    embedding, image_embeds = torch.randn(1, 512), torch.randn(1, 1024)
    outputs = [hosts.comfy(apply_node(nodes, hosts.model, adapter, embedding, image_embeds, lora_strength=0.0),
                           cond_or_uncond=[0, 1]) for adapter in (compact, full)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)
    assert (outputs[0] - hosts.comfy(cond_or_uncond=[0, 1])).abs().max() > 1e-4  # the adapter acts
