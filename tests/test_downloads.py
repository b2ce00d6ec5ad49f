"""Model downloads without the network: an unreachable HF_ENDPOINT, a local HTTP server, file:// URLs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from encoders.downloads import (
    ARC2FACE_REPO,
    FILE_GROUPS,
    STAGING,
    MissingModelFiles,
    RemoteFile,
    destination,
    download_file,
    ensure_files,
    first_hop,
    main,
)
from support.local_hub import UNREACHABLE, Server, hub_tree


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


def test_hub_files_come_through_huggingface_hub_with_the_token_and_leave_no_staging(tmp_path, monkeypatch):
    contents = {"exp_adapter/exp_adapter.bin": b"adapter" * 100}
    with Server(hub_tree(tmp_path / "hub", contents)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_a_gated_repo")
        models = tmp_path / "models"
        [path] = ensure_files([FILE_GROUPS["arc2face_expression"][0]], models, download=True)
        assert path.read_bytes() == contents["exp_adapter/exp_adapter.bin"]
        assert server.heads == [f"/{ARC2FACE_REPO}/resolve/main/exp_adapter/exp_adapter.bin"]  # huggingface_hub's metadata call
        assert server.authorizations == ["Bearer hf_test_token_for_a_gated_repo"]
        assert not (path.parent / STAGING).exists()


def test_a_truncated_hub_transfer_leaves_no_file_at_the_destination(tmp_path, monkeypatch, caplog):
    with Server(hub_tree(tmp_path / "hub", {"exp_adapter/exp_adapter.bin": b"x" * 1000})) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.broken.add(f"/{ARC2FACE_REPO}/resolve/main/exp_adapter/exp_adapter.bin")
        models = tmp_path / "models"
        with pytest.raises(MissingModelFiles, match=r"Could not download .*exp_adapter.bin"):
            ensure_files([FILE_GROUPS["arc2face_expression"][0]], models, download=True)
        destination_file = models / "expression_adapters" / "exp_adapter.bin"
        assert not destination_file.exists()
        # nothing under the staging folder has the file's name: no loader can take a part for the file
        assert [p for p in destination_file.parent.rglob("exp_adapter.bin") if p.is_file()] == []
        assert "Trying to resume download" in caplog.text  # huggingface_hub resumed from what it had


def test_other_hosts_files_are_checked_for_size_and_sha256(tmp_path):
    import hashlib

    good = tmp_path / "face_landmarker.task"
    good.write_bytes(b"task bundle")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    models = tmp_path / "models"
    entry = RemoteFile("mediapipe", "face_landmarker.task", url=good.as_uri(), size=11, sha256=digest)
    wrong_hash = RemoteFile("mediapipe", "face_landmarker.task", url=good.as_uri(), size=11, sha256="0" * 64)
    with pytest.raises(MissingModelFiles, match=r"sha256 .* differs from the published file's 0000"):
        ensure_files([wrong_hash], models, download=True, progress=False)
    assert list(models.rglob("*")) == [models / "mediapipe"]  # nothing left, not even the .part
    wrong_size = RemoteFile("mediapipe", "face_landmarker.task", url=good.as_uri(), size=12)
    with pytest.raises(MissingModelFiles, match=r"got 11 bytes where the published file has 12"):
        ensure_files([wrong_size], models, download=True, progress=False)

    [path] = ensure_files([entry], models, download=True, progress=False)
    assert path.read_bytes() == b"task bundle"
    path.write_bytes(b"task")  # a partial copy made by hand is not taken for the finished file
    with pytest.raises(MissingModelFiles):
        ensure_files([entry], models)
    assert ensure_files([entry], models, download=True, progress=False) == [path] and path.read_bytes() == b"task bundle"


def test_the_published_mediapipe_model_is_pinned_by_size_and_hash():
    [_, mediapipe] = FILE_GROUPS["smirk"]
    assert "/float16/1/" in mediapipe.url and mediapipe.size == 3758596
    assert mediapipe.sha256 == "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"  # as in DESIGN.md


def test_the_first_hop_is_the_proxy_where_one_applies(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert first_hop("https://huggingface.co/x") == ("huggingface.co", 443)
    assert first_hop("http://127.0.0.1:9") == ("127.0.0.1", 9)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    assert first_hop("https://huggingface.co/x") == ("proxy.example", 3128)
    assert first_hop("http://127.0.0.1:9") == ("127.0.0.1", 9)  # http, and bypassed


def test_an_unreachable_hub_is_reported_without_huggingface_hubs_retries(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    started = time.monotonic()
    with pytest.raises(MissingModelFiles, match="cannot reach the server"):
        ensure_files("arc2face", tmp_path, download=True, timeout=5)
    assert time.monotonic() - started < 5  # huggingface_hub alone waits 1 + 2 + 4 + 8 + 8 s
