"""Every model file the shipped workflows name, in ComfyUI's models-folder layout, for their headless runs.

ComfyUI recognises SD1.5 and SDXL checkpoints and CLIP vision models only at their real sizes, so these
are full size with random weights, written in the published formats and cached under
``$EXPRESSION_ADAPTERS_TEST_CACHE`` (default ``~/.cache/expression_adapters_tests``):
- ``official_files``: the Arc2Face UNet, its text/ID encoder, the SD VAE, the Expression Adapter and the
  Reference LoRA;
- ``emojidiff-random-v1``: an LDM single-file SD1.5 checkpoint (the parts above) and a ViT-H/14 CLIP
  vision model (transformers names, fp16);
- ``sdxl-random-v1``: an LDM single-file SDXL base checkpoint (ComfyUI's own UNet definition for the key
  names and shapes, CLIP-L as above, OpenCLIP bigG in its published key layout, the VAE above), fp16.
Small stand-ins are written per session: the insightface antelopev2 and buffalo_l folders (ONNX models
that "find" t1.jpg's faces), SMIRK, EmoNet, IP-Adapter FaceID/image files and FaceCrafter modules at full
width. InstantID's ``ip-adapter.bin`` (its own Resampler, built from the pack's code) is cached like the
checkpoints, written once in a process of its own. InstantID's face
analysis gets an antelopev2 folder of its own (``write_instantid_face_models``). MediaPipe is Google's real model
from the test cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from support.cache_locks import cache_root, filling
from support.e_adapter_standins import faceid_state, image_state
from support.official_files import SD15_WIDTHS, TEXT_ENCODER_FILE, UNET_FILE, VAE_FILE, official_models_dir
from support.onnx_face_models import export_detector, export_recognizer
from support.training_helpers import write_face_models, write_smirk_checkpoint

CACHE = cache_root()
SD15_CHECKPOINT = "checkpoints/v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "checkpoints/sd_xl_base_1.0.safetensors"
CLIP_VISION = "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
SDXL_WIDTHS = {"down_blocks": (320, 640, 1280), "up_blocks": (1280, 640, 320), "mid_block": (1280,)}

COMFY_UNET_COMMON = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                     "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
                     "use_temporal_resblock": False}
SD15_UNET = COMFY_UNET_COMMON | {
    "num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1, "context_dim": 768,
    "use_linear_in_transformer": False, "adm_in_channels": None, "num_heads": 8, "num_head_channels": -1}
SDXL_UNET = COMFY_UNET_COMMON | {
    "num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10, "context_dim": 2048,
    "use_linear_in_transformer": True, "adm_in_channels": 2816, "num_classes": "sequential", "num_heads": -1,
    "num_head_channels": 64}


def layer_width(widths: dict):
    def width(layout, layer) -> int:
        block, index = layer.diffusers_name.split(".")[:2]
        return widths[block][0 if block == "mid_block" else int(index)]
    return width


def _sd_parts() -> dict:
    """CLIP-L (``text_model.*``) and the VAE (diffusers names) of the cached official-format files."""
    from safetensors.torch import load_file

    official = official_models_dir()
    return {"text": torch.load(official / TEXT_ENCODER_FILE, weights_only=True), "vae": load_file(official / VAE_FILE)}


def write_sd15_checkpoint(path: Path) -> None:
    """An LDM single-file SD1.5 checkpoint from the cached diffusers-format parts."""
    import comfy.utils
    from safetensors.torch import load_file, save_file

    unet = load_file(official_models_dir() / UNET_FILE)
    state = {f"model.diffusion_model.{ldm}": unet[key] for key, ldm in comfy.utils.unet_to_diffusers(SD15_UNET).items() if key in unet}
    assert len(state) == len(unet)
    parts = _sd_parts()
    state |= {f"cond_stage_model.transformer.{key}": value for key, value in parts["text"].items()}
    state |= {f"first_stage_model.{key}": value for key, value in parts["vae"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def _random_like(shape, name: str, generator) -> torch.Tensor:
    """Random fp16 weights that keep activations in range: 1/sqrt(fan_in) matrices, unit norms, zero biases."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) <= 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = int(torch.tensor(shape[1:]).prod())
    return (torch.randn(shape, generator=generator) * fan_in**-0.5).to(torch.float16)


def _openclip_bigg_state(generator) -> dict:
    """OpenCLIP ViT-bigG/14's text tower under its published key names (as in sd_xl_base_1.0.safetensors)."""
    width, layers, vocab = 1280, 32, 49408
    shapes = {"positional_embedding": (77, width), "token_embedding.weight": (vocab, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width)}
    for block in range(layers):
        prefix = f"transformer.resblocks.{block}."
        shapes |= {prefix + name: shape for name, shape in {
            "ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (4 * width, width),
            "mlp.c_fc.bias": (4 * width,), "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}.items()}
    state = {name: _random_like(shape, name, generator) for name, shape in shapes.items()}
    state["positional_embedding"] = (torch.randn(77, width, generator=generator) * 0.01).half()
    state["token_embedding.weight"] = (torch.randn(vocab, width, generator=generator) * 0.02).half()
    state["logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    return state


def write_sdxl_checkpoint(path: Path) -> None:
    """An LDM single-file SDXL base checkpoint (about 6.9 GB, fp16), keys and shapes from ComfyUI's own UNet."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(5)
    unet = UNetModel(**SDXL_UNET, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    state = {f"model.diffusion_model.{key}": _random_like(tuple(value.shape), key, generator)
             for key, value in unet.state_dict().items()}
    del unet
    parts = _sd_parts()
    state |= {f"conditioner.embedders.0.transformer.{key}": value for key, value in parts["text"].items()}
    state |= {f"conditioner.embedders.1.model.{key}": value for key, value in _openclip_bigg_state(generator).items()}
    state |= {f"first_stage_model.{key}": value for key, value in parts["vae"].items()}
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


def cached(folder: str, files: dict) -> Path:
    """``CACHE/folder`` with each ``{name: writer}`` file written once (a ``.complete`` marker says all are)."""
    with filling(folder) as root:
        if not (root / ".complete").exists():
            for name, write in files.items():
                write(root / name)
            (root / ".complete").write_text("ok")
    return root


def write_full_size_facecrafter(path: Path) -> None:
    """Default-size FaceCrafter modules with every V random too (trained-like), so the branches change the picture."""
    from adapters.facecrafter import FaceCrafter

    torch.manual_seed(0)
    crafter = FaceCrafter()
    with torch.no_grad():
        for module in crafter.modules_present().values():
            for branch in module.kv.values():
                branch.to_v_ip.weight.normal_(0.0, 0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    crafter.save(path)


def write_emonet_standin(path: Path) -> None:
    """emonet_8.pth in the published layout (DataParallel ``module.`` keys), narrow and random."""
    from encoders.emotion import EmoNet

    torch.manual_seed(0)
    emonet = EmoNet(n_expression=8, stem=8, width=16, fc_hidden=16)
    with torch.no_grad():
        for module in emonet.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{key}": value for key, value in emonet.state_dict().items()}, path)


def write_instantid_model(path: Path, pack: Path) -> None:
    """InstantID's ``ip-adapter.bin`` as published (``torch.save``, fp32): ``{"image_proj": the state dict of the pack's
    own Resampler, "ip_adapter": {N.to_k_ip.weight, N.to_v_ip.weight}}`` on SDXL's 70 cross-attention layers (N = 1,
    3, 5, ...) at their real widths, from 2048-wide tokens. Random: the Resampler keeps torch's initialisation."""
    spec = importlib.util.spec_from_file_location("instantid_resampler", pack / "resampler.py")
    resampler_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resampler_module)  # plain torch; imports nothing of ComfyUI or of the pack
    torch.manual_seed(11)
    resampler = resampler_module.Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512,
                                           output_dim=2048, ff_mult=4)
    layers = image_state("SDXL", seed=12, token_dim=2048, width=layer_width(SDXL_WIDTHS), std=0.05)["ip_adapter"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj": resampler.state_dict(), "ip_adapter": layers}, path)


def write_instantid_face_models(comfyui_base: Path, t1) -> Path:
    """insightface's antelopev2 folder as InstantID Face Analysis reads it, in ComfyUI's own models folder of a
    ``--base-directory comfyui_base``: the detector and ``glintr100.onnx`` (512-d embeddings, what InstantID's
    Resampler takes), stand-ins that find t1.jpg's faces.

    InstantID reads ``<ComfyUI models folder>/insightface`` itself, never folder_paths (so no --models folder), and
    insightface takes the first recogniser by file name there: the antelopev2 folder of ``write_workflow_models``
    holds our 16-d ``arcface.onnx`` stand-in for the Arc2Face workflows, which it would take instead of glintr100.
    """
    from encoders.identity import DETECTOR_FILE

    rgb, boxes, kps = t1
    folder = comfyui_base / "models" / "insightface" / "models" / "antelopev2"
    folder.mkdir(parents=True)
    export_recognizer(folder / "glintr100.onnx", seed=3)
    export_detector(folder / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2])
    return folder


def write_cached_checkpoints() -> tuple[Path, Path]:
    sd15 = cached("emojidiff-random-v1", {SD15_CHECKPOINT: write_sd15_checkpoint, CLIP_VISION: write_clip_vision})
    sdxl = cached("sdxl-random-v1", {SDXL_CHECKPOINT: write_sdxl_checkpoint})
    return sd15, sdxl


def cached_in_own_process(folder: str, name: str, writer: str, *arguments: Path) -> Path:
    """``CACHE/folder/name``, written once by ``writer(path, *arguments)`` in a process of its own, so the test
    process never holds what building it takes (InstantID's 1.7 GB file)."""
    if not (CACHE / folder / ".complete").exists():
        here = Path(__file__).resolve().parents[1]  # tests/, where ``support`` is
        call = (f"import pathlib, support.workflow_models as m; m.cached({folder!r}, {{{name!r}: lambda path: m.{writer}(path, "
                + "".join(f"pathlib.Path({str(argument)!r}), " for argument in arguments) + ")})")
        subprocess.run([sys.executable, "-c", call], check=True, timeout=1800,
                       env=os.environ | {"PYTHONPATH": os.pathsep.join(map(str, (here, here.parent)))})
    return CACHE / folder / name


def write_workflow_models(root: Path, t1, comfyui: Path, instantid_pack: Path, landmarker: Path) -> list[Path]:
    """The models folders (ComfyUI layout) that together hold every file the shipped workflows load;
    ``instantid_pack``: the extracted ComfyUI_InstantID pack, whose Resampler InstantID's file holds;
    ``landmarker``: MediaPipe's real face_landmarker.task (the ``mediapipe_task`` fixture's).

    The cached checkpoints are written (once) in a process of their own: building them holds about 8 GB.
    """
    rgb, boxes, kps = t1
    official_models_dir()
    if not all((CACHE / folder / ".complete").exists() for folder in ("emojidiff-random-v1", "sdxl-random-v1")):
        here = Path(__file__).resolve().parents[1]  # tests/, where ``support`` is
        path = os.pathsep.join(map(str, (here, here.parent, comfyui)))
        subprocess.run([sys.executable, "-c", "import comfy.cli_args; comfy.cli_args.args.cpu = True; from support import workflow_models; "
                        "workflow_models.write_cached_checkpoints()"],
                       check=True, timeout=1800, env=os.environ | {"PYTHONPATH": path})
    sd15, sdxl = write_cached_checkpoints()
    for source in (sd15 / SD15_CHECKPOINT, sd15 / CLIP_VISION, sdxl / SDXL_CHECKPOINT):
        link = root / source.relative_to(source.parents[1])
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    faces = root / "insightface" / "models"
    write_face_models(faces / "antelopev2")
    (faces / "buffalo_l").mkdir()
    export_recognizer(faces / "buffalo_l" / "w600k_r50.onnx", seed=1)
    export_detector(faces / "buffalo_l" / "det_10g.onnx", boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2])
    (root / "smirk").mkdir()
    write_smirk_checkpoint(root / "smirk" / "SMIRK_em1.pt")
    write_emonet_standin(root / "emotion" / "emonet_8.pth")
    write_full_size_facecrafter(root / "expression_adapters" / "facecrafter.safetensors")
    instantid = cached_in_own_process("instantid-random-v1", "ip-adapter.bin", "write_instantid_model", instantid_pack)
    (root / "instantid").mkdir()
    (root / "instantid" / "ip-adapter.bin").symlink_to(instantid)
    (root / "ipadapter").mkdir()
    sd15_width, sdxl_width = layer_width(SD15_WIDTHS), layer_width(SDXL_WIDTHS)
    files = {"ip-adapter-faceid_sd15.bin": faceid_state("SD1.5", token_dim=768, lora_rank=8, width=sd15_width, std=0.05),
             "ip-adapter_sd15.bin": image_state("SD1.5", token_dim=768, width=sd15_width, std=0.05),
             "ip-adapter-faceid_sdxl.bin": faceid_state("SDXL", token_dim=2048, lora_rank=8, width=sdxl_width, std=0.05),
             "ip-adapter_sdxl_vit-h.bin": image_state("SDXL", token_dim=2048, width=sdxl_width, std=0.05)}
    for name, state in files.items():  # fp16, as published
        torch.save({part: {key: value.half() for key, value in weights.items()} for part, weights in state.items()},
                   root / "ipadapter" / name)
    (root / "mediapipe").mkdir()
    shutil.copyfile(landmarker, root / "mediapipe" / "face_landmarker.task")
    return [official_models_dir(), root]
