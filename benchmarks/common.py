"""Shared pieces of the sampling benchmarks: a random SD1.5-structured ComfyUI model, timed sampling."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflows import run  # noqa: E402


def start(comfyui: str | None, cpu: bool):
    """ComfyUI in-process with this pack loaded; returns the pack module."""
    comfyui_path = run.find_comfyui(comfyui)
    if comfyui_path is None:
        raise SystemExit("no ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH")
    # torch SDPA everywhere, as ComfyUI uses on GPUs, so base and patched attention compare like for like
    comfy_nodes = run.start_comfyui(comfyui_path, force_cpu=True if cpu else None, pytorch_attention=True)
    return run.load_pack(comfy_nodes, Path(tempfile.mkdtemp(prefix="expression_adapters_")))


def random_sd15_model(channels: int, device):
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": channels,
                   "use_spatial_transformer": True, "legacy": False, "context_dim": 768, "use_temporal_attention": False,
                   "use_temporal_resblock": False, "num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3,
                   "transformer_depth_middle": 1, "use_linear_in_transformer": False, "adm_in_channels": None}
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI builds UNets uninitialised
        for name, parameter in model.diffusion_model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def time_sampling(model, latent, positive, negative, steps: int) -> float:
    import comfy.model_management
    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 3.0, "dpmpp_2m", "normal", positive, negative, latent, disable_pbar=True, seed=1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    comfy.model_management.soft_empty_cache()  # between runs, outside the timing
    return elapsed


def arguments(doc: str, channels: int, repeats: int, argv=None):
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--comfyui")
    parser.add_argument("--channels", type=int, default=channels, help="model channels (SD1.5: 320)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true")
    return parser.parse_args(argv)


def compare_sampling(models: dict, positive, negative, args) -> dict[str, float]:
    """Median sampling time per model, runs interleaved so drift hits all alike; prints every run."""
    import comfy.model_management

    latent = torch.zeros(1, 4, 64, 64)
    for model in models.values():  # warm-up: model load, kernel selection
        time_sampling(model, latent, positive, negative, 2)
    timings = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            timings[name].append(time_sampling(model, latent, positive, negative, args.steps))
    print(f"device {comfy.model_management.get_torch_device()}, SD1.5 structure with {args.channels} channels, "
          f"64x64 latent, {args.steps} DPM++ 2M steps, CFG 3, {args.repeats} repeats")
    for name, values in timings.items():
        print(f"  {name:24s} median {statistics.median(values):.3f} s  (runs: {', '.join(f'{v:.3f}' for v in values)})")
    return {name: statistics.median(values) for name, values in timings.items()}
