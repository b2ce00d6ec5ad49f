"""Hostile and careless prompts through a real ComfyUI server's HTTP API (issue 22), loopback only, bounded.

One server (``python main.py`` with this pack, on 127.0.0.1) gets one prompt per finding: a file name that
leaves its folder, a pickle that would run code, a weights file that is a web page, more JSON rows than
are read, a chart asking for gigabytes. Each must come back as an error the user can act on (or as bounded
work), nothing may be written outside output/temp/user and the models folders, and a good prompt must still
run after each.
"""

from __future__ import annotations

import json
import os
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from support.comfy_browser import ComfyServer
from workflows import run as runner

pytestmark = pytest.mark.comfyui
FINISH_TIMEOUT = 120


class RunsCode:
    """Unpickled without weights_only, this would run ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui = runner.find_comfyui()
    if comfyui is None:
        pytest.skip("no ComfyUI")
    base = tmp_path_factory.mktemp("hostile_server")
    models = base / "models" / "expression_adapters"
    models.mkdir(parents=True)
    marker = base / "payload-ran"
    torch.save({"image_proj": RunsCode(marker)}, models / "exp_adapter.bin")
    (models / "page.safetensors").write_text("<!DOCTYPE html><html><body>a model page</body></html>")
    (models / "null_header.safetensors").write_bytes(struct.pack("<Q", 4) + b"null")
    with ComfyServer(comfyui, base) as running:
        running.marker = marker
        yield running


def post_prompt(server, prompt: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def finished(server, prompt_id: str) -> dict:
    deadline = time.monotonic() + FINISH_TIMEOUT
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {FINISH_TIMEOUT} s")


def error_of(server, prompt: dict) -> str:
    """The message a user reads for a prompt that must fail while running (accepted at validation: 0.3.64 does
    not check V3 combos), after checking the server still runs a good prompt."""
    status, answer = post_prompt(server, prompt)
    if status != 200:
        message = json.dumps(answer)
    else:
        record = finished(server, answer["prompt_id"])
        errors = [data for kind, data in record["status"]["messages"] if kind == "execution_error"]
        assert errors, record["status"]
        message = errors[0]["exception_message"]
    assert_good_prompt_runs(server)
    return message


def chart_prompt(json_values: str, width: int = 300, height: int = 120) -> dict:
    return {"1": {"class_type": "ExpressionAdaptersFlameExpression",
                  "inputs": {"json_values": json_values, "jaw_open": 0.0, "eyelid_left": 0.0, "eyelid_right": 0.0,
                             **{f"expression_{i}": 0.0 for i in range(1, 6)}}},
            "2": {"class_type": "ExpressionAdaptersFlameChart",
                  "inputs": {"expression": ["1", 0], "width": width, "height": height, "limit": 0.0}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def assert_good_prompt_runs(server) -> None:
    status, answer = post_prompt(server, chart_prompt(json.dumps([0.5] * 55)))
    assert status == 200, answer
    record = finished(server, answer["prompt_id"])
    assert record["status"]["status_str"] == "success", record["status"]


def peak_memory_gb(server) -> float:
    """The server process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise AssertionError("no VmHWM in /proc")


def loader(class_type: str, **inputs) -> dict:
    return {"1": {"class_type": class_type, "inputs": inputs},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def test_loaders_stay_listed_beside_unreadable_files(server):
    info = server.get_json("/object_info")
    for node in ("LoadExpressionAdapter", "LoadReferenceAdapter", "LoadEAdapter", "LoadFaceCrafter"):
        assert f"ExpressionAdapters{node}" in info
    listed = info["ExpressionAdaptersLoadExpressionAdapter"]["input"]["required"]["adapter_name"][0]
    assert "page.safetensors" not in listed and "null_header.safetensors" not in listed
    assert "null_header.safetensors" in server.log_text() and "left out of the loaders' lists" in server.log_text()


@pytest.mark.parametrize(("name", "cause"), [("page.safetensors", "it is a web page (HTML), not weights"),
                                             ("null_header.safetensors", "not a safetensors file (its header is not a JSON object)")])
def test_choosing_an_unlisted_unreadable_file_names_the_cause(server, name, cause):
    message = error_of(server, loader("ExpressionAdaptersLoadExpressionAdapter", adapter_name=name))
    assert f"cannot read {name} as weights: {cause}" in message


def test_a_pickle_payload_is_refused_and_never_runs(server):
    message = error_of(server, loader("ExpressionAdaptersLoadExpressionAdapter", adapter_name="exp_adapter.bin"))
    assert "asks to run code when loaded, which is refused" in message and "exp_adapter.bin" in message
    assert "weights_only" not in message
    assert not server.marker.exists()


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../etc/passwd"])
def test_a_file_name_outside_its_folder_is_refused(server, name):
    message = error_of(server, loader("ExpressionAdaptersLoadExpressionAdapter", adapter_name=name))
    assert "is not one of its choices" in message and "save it as" not in message


def test_the_id_encoder_never_creates_or_downloads_outside(server, tmp_path):
    outside = tmp_path / "elsewhere" / "encoder"
    message = error_of(server, loader("ExpressionAdaptersLoadArc2FaceIDEncoder", encoder_name=str(outside),
                                      download_missing=True))
    assert "is not one of its choices" in message
    assert not (tmp_path / "elsewhere").exists()


def test_more_json_rows_than_are_read_are_refused(server):
    message = error_of(server, chart_prompt(json.dumps([[0.0] * 55] * 5000)))
    assert "5000 rows; at most 4096 are read from text or a file" in message


def test_a_huge_chart_request_stays_bounded(server):
    temp = Path(server.base) / "temp"
    before = sum(path.stat().st_size for path in temp.rglob("*") if path.is_file()) if temp.exists() else 0
    status, answer = post_prompt(server, chart_prompt(json.dumps([[0.1] * 55] * 4096), width=2048, height=1024))
    assert status == 200, answer
    record = finished(server, answer["prompt_id"])
    assert record["status"]["status_str"] == "success"
    images = record["outputs"]["3"]["images"]
    assert len(images) == (64 << 20) // (2048 * 1024)  # the rows that fit 64 Mpx, not 4,096
    written = sum(path.stat().st_size for path in temp.rglob("*") if path.is_file()) - before
    assert written < 200 << 20
    assert "drawing the first 32 of 4096 rows" in server.log_text()
    assert peak_memory_gb(server) < 6  # 4,096 charts would have been a 103 GB tensor


def test_nothing_was_written_outside_the_servers_folders(server):
    allowed = {"custom_nodes", "input", "output", "temp", "user", "models", "server.log", "payload-ran"}
    assert {path.name for path in Path(server.base).iterdir()} <= allowed
    assert not server.marker.exists()
