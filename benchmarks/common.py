"""Shared pieces of the sampling benchmarks: a random SD1.5-structured ComfyUI model, timed sampling
(device synchronised, models timed in blocks) and FLOP counting (:func:`count_flops`)."""

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


def synchronize() -> None:
    """Wait for queued GPU work, so a timer around it measures the work and not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run) -> float:
    """Seconds ``run()`` takes, the device synchronised before and after."""
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start


def sample(model, latent, positive, negative, steps: int):
    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(model, noise, steps, 3.0, "dpmpp_2m", "normal", positive, negative, latent,
                               disable_pbar=True, seed=1)


def time_sampling(model, latent, positive, negative, steps: int) -> float:
    import comfy.model_management

    elapsed = timed(lambda: sample(model, latent, positive, negative, steps))
    comfy.model_management.soft_empty_cache()  # between runs, outside the timing
    return elapsed


def load_seconds(model) -> float:
    """Seconds ComfyUI takes to make ``model`` the loaded one: applying or removing its weight patches (the
    Reference Adapter's LoRA merge), once per switch between differently patched models."""
    import comfy.model_management

    return timed(lambda: comfy.model_management.load_models_gpu([model]))


def arguments(doc: str, channels: int, repeats: int, argv=None):
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--comfyui")
    parser.add_argument("--channels", type=int, default=None,
                        help=f"model channels (SD1.5: 320); default {channels}, or 320 with --flops")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--flops", action="store_true",
                        help="count FLOPs instead of timing (full SD1.5 width unless --channels is given; builds an "
                             "860M-parameter UNet, about 3.5 GB in float32)")
    args = parser.parse_args(argv)
    if args.channels is None:
        args.channels = 320 if args.flops else channels
    return args


def compare_sampling(models: dict, positive, negative, args) -> dict[str, float]:
    """Median sampling time per model, timed in blocks (all runs of one model, then the next), so ComfyUI
    patches each model's weights once per block rather than before every run; that one-off switch is timed
    and printed on its own. Prints every run."""
    import comfy.model_management

    latent = torch.zeros(1, 4, 64, 64)
    timings, switches = {}, {}
    for name, model in models.items():
        switches[name] = load_seconds(model)
        time_sampling(model, latent, positive, negative, 2)  # warm-up: kernel selection, caches
        timings[name] = [time_sampling(model, latent, positive, negative, args.steps) for _ in range(args.repeats)]
    print(f"device {comfy.model_management.get_torch_device()}, SD1.5 structure with {args.channels} channels, "
          f"64x64 latent, {args.steps} DPM++ 2M steps, CFG 3, {args.repeats} repeats per block"
          + ("" if torch.cuda.is_available() else " (CPU wall clock at reduced width: not the GPU figure the goal is for)"))
    for name, values in timings.items():
        print(f"  {name:24s} median {statistics.median(values):.3f} s  (runs: {', '.join(f'{v:.3f}' for v in values)})")
    for name, seconds in switches.items():
        print(f"  switching to {name}: {seconds:.3f} s once (ComfyUI applies or removes weight patches, e.g. a LoRA merge)")
    return {name: statistics.median(values) for name, values in timings.items()}


def count_flops(run) -> int:
    """Floating-point operations ``run()`` performs, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (a multiply-add is 2). Deterministic on any machine. torch counts no FLOPs for its CPU flash-attention
    kernel, so that one gets the formula torch uses for the GPU attention kernels."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops()


def sampling_flops(model, latent, positive, negative) -> tuple[int, int]:
    """(FLOPs per sampling step, one-off FLOPs per generation) of ``model``: sampling 2 steps minus sampling
    1 step is one step; what 1 step costs beyond that is done once per generation (e.g. projecting constant
    adapter keys/values, if they are cached)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    one = count_flops(lambda: sample(model, latent, positive, negative, 1))
    two = count_flops(lambda: sample(model, latent, positive, negative, 2))
    return two - one, one - (two - one)


def compare_flops(models: dict, positive, negative, args) -> dict[str, tuple[int, int]]:
    """Per-step and one-off FLOPs of each model (SD1.5 structure, 64x64 latent, CFG batch of 2); prints them
    and each model's per-step ratio to the first."""
    latent = torch.zeros(1, 4, 64, 64)
    counts = {name: sampling_flops(model, latent, positive, negative) for name, model in models.items()}
    print(f"FLOPs, SD1.5 structure with {args.channels} channels, 64x64 latent, CFG 3 (cond + uncond rows), "
          f"per DPM++ 2M step and once per generation:")
    base_name, (base_step, _) = next(iter(counts.items()))
    for name, (step, once) in counts.items():
        print(f"  {name:24s} per step {step / 1e9:10.2f} GFLOP   once {once / 1e9:8.3f} GFLOP   "
              f"ratio per step to {base_name}: {step / base_step:.4f}")
    return counts
