"""The one full-size headless run of an EmojiDiff workflow: ``emojidiff_sd15`` through ``workflows/run.py``.

ComfyUI recognises an SD1.5 checkpoint and a ViT-H/14 CLIP vision model only at their real sizes, so
this test writes them with random weights in the published formats (an LDM single-file checkpoint
built from ``official_files``' cached UNet, CLIP-L and VAE; a transformers ``CLIPVisionModelWithProjection``
of ViT-H/14's shape, fp16), cached under ``$EXPRESSION_ADAPTERS_TEST_CACHE/emojidiff-random-v1``. The
IP-Adapter files are full-width stand-ins; the face models are the stand-in ONNX detector/recogniser
(buffalo_l layout) and the real MediaPipe landmarker where it is cached. Peak memory is about 7 GB
(the UNet and the ViT-H in fp32 on the CPU): it runs twice (with and without the adapter), at 64x64,
2 steps. The SDXL workflow is validated against the node definitions instead
(``test_e_adapter_nodes.py``), and the SDXL path of the nodes runs there on a tiny SDXL model.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from e_adapter_standins import faceid_state, image_state
from encoders.identity import DETECTOR_FILE
from official_files import SD15_WIDTHS, TEXT_ENCODER_FILE, UNET_FILE, VAE_FILE, official_models_dir
from onnx_face_models import export_detector, export_recognizer
from workflows import run

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")]
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "api" / "emojidiff_sd15.json"
CACHE = Path(os.environ.get("EXPRESSION_ADAPTERS_TEST_CACHE", Path.home() / ".cache" / "expression_adapters_tests"))
LANDMARKER = CACHE / "mediapipe" / "face_landmarker.task"
CHECKPOINT = "checkpoints/v1-5-pruned-emaonly.safetensors"
CLIP_VISION = "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def sd15_width(layout, layer) -> int:
    block, index = layer.diffusers_name.split(".")[:2]
    return SD15_WIDTHS[block][0 if block == "mid_block" else int(index)]


def write_checkpoint(path: Path) -> None:
    """An LDM single-file SD1.5 checkpoint from the cached diffusers-format parts."""
    import comfy.utils
    from safetensors.torch import load_file, save_file

    official = official_models_dir()
    unet_config = {"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1, "model_channels": 320,
                   "in_channels": 4, "context_dim": 768, "num_heads": 8, "num_head_channels": -1, "use_linear_in_transformer": False}
    unet = load_file(official / UNET_FILE)
    state = {f"model.diffusion_model.{ldm}": unet[key] for key, ldm in comfy.utils.unet_to_diffusers(unet_config).items() if key in unet}
    assert len(state) == len(unet)
    text = torch.load(official / TEXT_ENCODER_FILE, weights_only=True)
    state |= {f"cond_stage_model.transformer.{key}": value for key, value in text.items()}
    state |= {f"first_stage_model.{key}": value for key, value in load_file(official / VAE_FILE).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def write_clip_vision(path: Path) -> None:
    """Random weights of ViT-H/14's shape with its 1024-d projection, as transformers names them."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(4)
    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
    model = CLIPVisionModelWithProjection(config)
    state = {key: value.detach().to(torch.float16).contiguous() for key, value in model.state_dict().items()}
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def emojidiff_models(tmp_path_factory, t1):
    big = CACHE / "emojidiff-random-v1"
    if not (big / ".complete").exists():
        write_checkpoint(big / CHECKPOINT)
        write_clip_vision(big / CLIP_VISION)
        (big / ".complete").write_text("ok")
    root = tmp_path_factory.mktemp("emojidiff_models")
    for name in (CHECKPOINT, CLIP_VISION):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(big / name, root / name)
    (root / "ipadapter").mkdir()
    torch.save(faceid_state("SD1.5", token_dim=768, lora_rank=8, width=sd15_width, std=0.05), root / "ipadapter" / "ip-adapter-faceid_sd15.bin")
    torch.save(image_state("SD1.5", token_dim=768, width=sd15_width, std=0.05), root / "ipadapter" / "ip-adapter_sd15.bin")
    rgb, boxes, kps = t1
    buffalo_l = root / "insightface" / "models" / "buffalo_l"
    buffalo_l.mkdir(parents=True)
    export_recognizer(buffalo_l / "w600k_r50.onnx", seed=1)
    export_detector(buffalo_l / "det_10g.onnx", boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2])
    assert not (buffalo_l / DETECTOR_FILE).exists()
    (root / "mediapipe").mkdir()
    shutil.copyfile(LANDMARKER, root / "mediapipe" / "face_landmarker.task")
    return root


def run_headless(out: Path, models: Path, identity: Path, expression: Path, *extra) -> Path:
    printed = io.StringIO()
    small = ["--set", "15.width=64", "--set", "15.height=64", "--set", "16.steps=2", "--seed", "7"]
    with contextlib.redirect_stdout(printed):
        assert run.main([str(WORKFLOW), "--models", str(models), "--output-dir", str(out), "--cpu",
                         "--image", f"1={identity}", "--image", f"2={expression}", *small, *extra]) == 0
    [image] = [Path(line) for line in printed.getvalue().split() if line.endswith(".png")]
    return image


@pytest.mark.skipif(not LANDMARKER.is_file(), reason=f"the real MediaPipe model is not cached at {LANDMARKER}")
def test_emojidiff_sd15_workflow_runs_headless_and_the_adapter_acts(comfy, emojidiff_models, t1, tmp_path):
    rgb, boxes, _ = t1
    identity = tmp_path / "identity.png"
    Image.fromarray(rgb).save(identity)
    x0, y0, x1, y1 = boxes[1]
    side = 2.2 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    expression = tmp_path / "expression.png"
    Image.fromarray(rgb).crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))).resize(
        (256, 256)).save(expression)
    with_adapter = np.asarray(Image.open(run_headless(tmp_path / "a", emojidiff_models, identity, expression)))
    without = np.asarray(Image.open(run_headless(tmp_path / "b", emojidiff_models, identity, expression,
                                                 "--set", "12.id_strength=0", "--set", "12.expression_strength=0",
                                                 "--set", "12.lora_strength=0")))
    assert with_adapter.shape == (64, 64, 3) and with_adapter.std() > 0
    assert np.abs(with_adapter.astype(int) - without.astype(int)).max() > 0
