"""Unreadable weight files get one message naming the file, what it is and why; loaders' lists never break.

The files are what users end up with: a pickle that would run code when loaded (the marker file it would
write must never appear), an empty or cut-short download, a web page or a git-lfs pointer saved under the
weights' name, random bytes, and safetensors headers that lie about their length or are not JSON objects.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zipfile

import pytest
import torch

from adapters.checkpoints import (
    EXPRESSION_ADAPTER_FILE,
    WeightFileError,
    adapter_file_kind,
    read_checkpoint,
    read_safetensors_metadata,
    write_safetensors,
)


class RunsCode:
    """A pickle payload: unpickling it without weights_only would call os.system and create the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def good_bin(tmp_path):
    path = tmp_path / "good.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(4, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(4, 4)}}, path)
    return path


def safetensors_with_header(path, header: bytes, length: int | None = None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * 16)
    return path


CASES = {
    "empty.bin": (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    "page.safetensors": (lambda p: p.write_text("<!DOCTYPE html><html><body>model page</body></html>"), "web page (HTML)"),
    "pointer.safetensors": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"),
                            "git-lfs pointer"),
    "noise.bin": (lambda p: p.write_bytes(bytes(range(7, 256)) * 16), "not a readable PyTorch file, or cut short at 3984 bytes"),
    "noise.safetensors": (lambda p: p.write_bytes(b"\xff" * 8 + bytes(range(256)) * 16), "header length reads"),
    "five.safetensors": (lambda p: safetensors_with_header(p, b"5"), "its header is not a JSON object"),
    "null.safetensors": (lambda p: safetensors_with_header(p, b"null"), "its header is not a JSON object"),
    "liar.safetensors": (lambda p: safetensors_with_header(p, b"{}", length=1 << 40), "header length reads 1099511627776"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_unreadable_file_is_named_with_its_cause(tmp_path, name):
    write, cause = CASES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(WeightFileError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert cause in message and str(path) in message and "weights_only" not in message
    assert adapter_file_kind(path) is None if name.endswith(".safetensors") else True  # never raises


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "exp_adapter.bin"
    torch.save({"image_proj": RunsCode(marker)}, path)
    with pytest.raises(WeightFileError, match="it asks to run code when loaded, which is refused") as caught:
        read_checkpoint(path)
    assert "weights_only" not in str(caught.value) and str(path) in str(caught.value)
    assert "system" in str(caught.value)  # what it would have called
    assert not marker.exists()


def test_a_cut_short_download_says_how_much_arrived(tmp_path):
    whole = good_bin(tmp_path).read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightFileError, match=rf"cut short at {len(whole) // 2} bytes"):
        read_checkpoint(cut)
    assert read_checkpoint(good_bin(tmp_path))["image_proj"]["proj.weight"].shape == (4, 4)  # a good one still reads


def test_a_list_instead_of_a_dictionary_is_named(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(WeightFileError, match="it holds a list, not a dictionary of tensors"):
        read_checkpoint(path)


def test_sorting_files_by_kind_survives_bad_files_and_logs_each_once(tmp_path, caplog):
    good = tmp_path / "expression.safetensors"
    write_safetensors({"image_proj.proj.weight": torch.ones(2, 2), "ip_adapter.1.to_k_ip.weight": torch.ones(2, 2)}, good)
    bad = safetensors_with_header(tmp_path / "bad.safetensors", b"null")
    with caplog.at_level(logging.WARNING):
        kinds = [adapter_file_kind(path) for path in (good, bad, bad, good)]
    assert kinds == [EXPRESSION_ADAPTER_FILE, None, None, EXPRESSION_ADAPTER_FILE]
    said = [record.getMessage() for record in caplog.records if "bad.safetensors" in record.getMessage()]
    assert len(said) == 1 and "header is not a JSON object" in said[0] and "left out of the loaders' lists" in said[0]


def test_metadata_of_an_unreadable_file_is_the_same_error(tmp_path):
    path = safetensors_with_header(tmp_path / "five.safetensors", b"5")
    with pytest.raises(WeightFileError, match="header is not a JSON object"):
        read_safetensors_metadata(path)
    meta = tmp_path / "meta.safetensors"
    write_safetensors({"w": torch.ones(1)}, meta, metadata={"kind": "test"})
    assert read_safetensors_metadata(meta) == {"kind": "test"}


def test_a_zip_that_is_not_a_torch_file_is_named(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", json.dumps({"not": "weights"}))
    path = tmp_path / "archive.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(WeightFileError, match="not a readable PyTorch file"):
        read_checkpoint(path)
