"""Model downloads without the network: an unreachable HF_ENDPOINT, a local HTTP server, file:// URLs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from encoders.downloads import (
    ARC2FACE_REPO,
    FILE_GROUPS,
    MissingModelFiles,
    RemoteFile,
    destination,
    download_file,
    ensure_files,
    main,
)
from local_hub import UNREACHABLE, Server, hub_tree


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part")]


def test_urls_follow_hf_endpoint(monkeypatch):
    entry = FILE_GROUPS["arc2face"][-1]
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert entry.source() == "https://huggingface.co/FoivosPar/Arc2Face/resolve/main/arcface.onnx"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert entry.source() == "https://mirror.example/FoivosPar/Arc2Face/resolve/main/arcface.onnx"


def test_missing_files_are_listed_with_url_and_destination_when_not_downloading(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    with pytest.raises(MissingModelFiles) as error:
        ensure_files("arc2face", tmp_path)
    message = str(error.value)
    assert "5 model file(s) missing" in message
    for entry in FILE_GROUPS["arc2face"]:
        url = f"https://huggingface.co/{ARC2FACE_REPO}/resolve/main/{entry.filename}"
        assert f"{url}\n    -> {tmp_path / entry.folder / entry.path}" in message
    assert len(error.value.missing) == 5
    assert list(tmp_path.iterdir()) == []


def test_offline_download_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    present = destination(FILE_GROUPS["arc2face"][0], tmp_path)
    present.parent.mkdir(parents=True)
    present.write_text("{}")
    with pytest.raises(MissingModelFiles) as error:
        ensure_files("arc2face", tmp_path, download=True, timeout=5)
    message = str(error.value)
    first = f"{UNREACHABLE}/{ARC2FACE_REPO}/resolve/main/arc2face/diffusion_pytorch_model.safetensors"
    assert message.startswith(f"Could not download {first} (cannot reach the server")
    assert f"{first}\n    -> {tmp_path / 'diffusion_models' / 'arc2face' / 'diffusion_pytorch_model.safetensors'}" in message
    assert f"{UNREACHABLE}/{ARC2FACE_REPO}/resolve/main/arcface.onnx\n    -> " in message
    assert "arc2face/config.json\n" not in message  # the file already in place is not listed
    assert [source for source, _ in error.value.missing][0] == first and len(error.value.missing) == 4
    assert leftovers(tmp_path) == []


def test_download_from_local_server_is_atomic_and_skips_present_files(tmp_path, monkeypatch, caplog):
    contents = {"exp_adapter/exp_adapter.bin": b"adapter" * 1000, "ref_adapter/pytorch_lora_weights.safetensors": b"lora"}
    with Server(hub_tree(tmp_path / "hub", contents)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        models = tmp_path / "models"
        with caplog.at_level(logging.INFO, logger="encoders.downloads"):
            paths = ensure_files("arc2face_expression", models, download=True, progress=False)
        assert paths == [models / "expression_adapters/exp_adapter.bin", models / "expression_adapters/ref_adapter/pytorch_lora_weights.safetensors"]
        assert paths[0].read_bytes() == contents["exp_adapter/exp_adapter.bin"]
        assert paths[1].read_bytes() == b"lora"
        assert len(server.requests) == 2 and leftovers(models) == []
        log = caplog.text
        assert f"{server.url}/{ARC2FACE_REPO}/resolve/main/exp_adapter/exp_adapter.bin -> {paths[0]}" in log

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="encoders.downloads"):
            assert ensure_files("arc2face_expression", models, download=True) == paths
        assert len(server.requests) == 2  # nothing fetched again
        assert f"Model file present: {paths[0]}" in caplog.text

        # an interrupted transfer leaves neither the file nor its temporary part
        paths[1].unlink()
        server.broken.add(f"/{ARC2FACE_REPO}/resolve/main/ref_adapter/pytorch_lora_weights.safetensors")
        with pytest.raises(MissingModelFiles, match=r"Could not download .*pytorch_lora_weights.safetensors"):
            ensure_files("arc2face_expression", models, download=True, progress=False)
        assert not paths[1].exists() and leftovers(models) == []

        entry = RemoteFile("loras", "x.safetensors", ARC2FACE_REPO, "not/there.bin")
        with pytest.raises(MissingModelFiles, match=r"HTTP 404"):
            ensure_files([entry], models, download=True)
        assert leftovers(models) == []


def test_download_file_replaces_via_file_url_and_folder_overrides(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc" * 100)
    entry = RemoteFile("arc2face", "encoder/blob.bin", url=source.as_uri())
    custom = tmp_path / "elsewhere"
    [path] = ensure_files([entry], tmp_path / "models", download=True, folders={"arc2face": custom}, progress=False)
    assert path == custom / "encoder" / "blob.bin" and path.read_bytes() == source.read_bytes()
    source.write_bytes(b"new")
    assert download_file(source.as_uri(), path, progress=True).read_bytes() == b"new"


def test_manual_files_are_reported_after_the_downloadable_ones(tmp_path):
    source = tmp_path / "face_landmarker.task"
    source.write_bytes(b"task")
    files = [FILE_GROUPS["smirk"][0], RemoteFile("mediapipe", "face_landmarker.task", url=source.as_uri())]
    with pytest.raises(MissingModelFiles, match=r"(?s)cannot be downloaded automatically.*georgeretsi/smirk") as error:
        ensure_files(files, tmp_path / "models", download=True, progress=False)
    assert (tmp_path / "models" / "mediapipe" / "face_landmarker.task").read_bytes() == b"task"
    assert error.value.missing == [(files[0].manual, tmp_path / "models" / "smirk" / "SMIRK_em1.pt")]


def test_command_line_check(tmp_path, capsys):
    assert main(["arc2face_expression", "--models-dir", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "2 model file(s) missing" in err and str(tmp_path / "expression_adapters" / "ref_adapter" / "pytorch_lora_weights.safetensors") in err
