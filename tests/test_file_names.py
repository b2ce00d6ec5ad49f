"""Every file name a node takes stays inside its model folder (issue 22's path traversal findings).

ComfyUI 0.3.64 does not check a V3 combo's value against its options, so through the API a loader's
file name can be any string. Our loaders check it against what their schema lists now, and the folder
helpers judge the name itself (absolute, a drive, ``..``), never the resolved path, so model folders
that are links to other disks keep working. Nothing is created, read or downloaded outside them, and no
message offers a refused name as a place to save a file.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.comfyui

HOSTILE = ["/etc/passwd", "../../../../etc/passwd", "sub/../../escape.bin", "C:\\\\Windows\\\\x.bin", "..\\\\up.bin",
           "ok.bin\x00.png", ""]


def use_folders(patch, name: str, *paths) -> None:
    import folder_paths

    extensions = folder_paths.folder_names_and_paths[name][1]
    patch.setitem(folder_paths.folder_names_and_paths, name, ([str(path) for path in paths], extensions))


@pytest.mark.parametrize("name", ["exp_adapter.bin", "sub/exp_adapter.bin", "a..b.bin", "v1.2/file..bin"])
def test_names_inside_a_folder_pass(comfy, name):
    assert comfy.pack.nodes.model_folders.check_name_inside(name, "test") == name


@pytest.mark.parametrize("name", HOSTILE)
def test_names_that_leave_their_folder_are_refused(comfy, name):
    with pytest.raises(ValueError, match="is not a name inside its model folder"):
        comfy.pack.nodes.model_folders.check_name_inside(name, "test")


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../etc/passwd"])
def test_loaders_refuse_names_they_do_not_list_without_offering_them_as_a_place(comfy, tmp_path, monkeypatch, name):
    nodes = comfy.pack.nodes
    use_folders(monkeypatch, "expression_adapters", tmp_path / "expression_adapters")
    loaders = [(nodes.expression_adapter_nodes.LoadExpressionAdapter, {"adapter_name": name}),
               (nodes.reference_nodes.LoadReferenceAdapter, {"lora_name": name}),
               (nodes.facecrafter_nodes.LoadFaceCrafter, {"facecrafter_name": name}),
               (nodes.expression_encoder_nodes.LoadSmirkEncoder, {"model_name": name}),
               (nodes.expression_encoder_nodes.LoadEmoNet, {"model_name": name}),
               (nodes.expression_encoder_nodes.LoadFaceLandmarker, {"model_name": name, "max_faces": 1, "min_confidence": 0.5}),
               (nodes.e_adapter_nodes.LoadEAdapter, {"source": "e_adapter_file", "e_adapter_name": name,
                                                     "faceid_name": "none", "image_name": "none"}),
               (nodes.e_adapter_nodes.LoadEAdapter, {"source": "bogus", "e_adapter_name": "none",
                                                     "faceid_name": "none", "image_name": "none"})]
    for loader, inputs in loaders:
        with pytest.raises(ValueError, match="is not one of its choices") as caught:
            loader.execute(**inputs)
        assert "save it as" not in str(caught.value) and "Download it" not in str(caught.value)


def test_the_id_encoder_loader_never_reads_or_creates_a_folder_outside(comfy, tmp_path, monkeypatch):
    identity = comfy.pack.nodes.identity_nodes
    use_folders(monkeypatch, "arc2face", tmp_path / "arc2face")
    outside = tmp_path / "outside" / "encoder"
    for name in (str(outside), "../outside/encoder"):
        for download in (False, True):
            with pytest.raises(ValueError, match="is not one of its choices"):
                identity.LoadArc2FaceIDEncoder.execute(encoder_name=name, download_missing=download)
        with pytest.raises(ValueError, match="is not a name inside its model folder"):
            identity.encoder_folder(name)  # the folder helper judges the name too
    assert not (tmp_path / "outside").exists()


def test_the_recognizer_choice_stays_in_the_insightface_folder(comfy, tmp_path, monkeypatch):
    identity = comfy.pack.nodes.identity_nodes
    use_folders(monkeypatch, "insightface", tmp_path / "insightface")
    evil = tmp_path / "evil" / "x.onnx"
    evil.parent.mkdir()
    evil.write_bytes(b"not a model")
    for name in ("../../evil/x.onnx", str(evil)):
        with pytest.raises(ValueError, match="is not one of its choices"):
            identity.LoadInsightFace.execute(provider="cpu", det_size=640, download_missing=False, recognizer=name)
        with pytest.raises(ValueError, match="is not a name inside its model folder"):
            identity.recognizer_path(name)


def test_a_model_folder_that_links_to_another_disk_keeps_working(comfy, tmp_path, monkeypatch):
    from support.tiny_unets import random_expression_adapter

    other_disk = tmp_path / "other_disk"
    other_disk.mkdir()
    random_expression_adapter().save(other_disk / "mine.safetensors")
    link = tmp_path / "models" / "expression_adapters"
    link.parent.mkdir()
    os.symlink(other_disk, link, target_is_directory=True)
    use_folders(monkeypatch, "expression_adapters", link)
    [adapter] = comfy.pack.nodes.expression_adapter_nodes.LoadExpressionAdapter.execute(adapter_name="mine.safetensors").args
    assert isinstance(next(adapter.parameters()), torch.Tensor)


def test_the_published_name_stays_listed_so_its_error_can_guide(comfy, tmp_path, monkeypatch):
    """Newer ComfyUI checks a V3 combo's value against its options before the node runs: a workflow saved with the
    published file name must pass that check even when other files are there, to reach the loader's own error."""
    encoders = comfy.pack.nodes.expression_encoder_nodes
    folder = tmp_path / "emotion"
    folder.mkdir()
    (folder / "my_emonet.pth").write_bytes(b"")
    use_folders(monkeypatch, "emotion", folder)
    options = encoders.LoadEmoNet.define_schema().inputs[0].options
    assert options == ["my_emonet.pth", "emonet_8.pth"]  # a file that is there first: a new node shows it
    with pytest.raises(FileNotFoundError, match=r"'emonet_8.pth' not found in the 'emotion' model folder .* save it as"):
        encoders.LoadEmoNet.execute(model_name="emonet_8.pth")
