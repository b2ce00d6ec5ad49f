"""Sampling time with the Expression Adapter vs without, measured side by side in one process.

    python benchmarks/expression_adapter_overhead.py [--comfyui PATH] [--channels 64] [--repeats 5]

A ComfyUI UNet with the full SD1.5 block structure (channels narrowed by --channels; 320 is real
SD1.5), random weights, a 64x64 latent, 10 DPM++ 2M steps with CFG 3. Runs alternate between
the plain and the patched model; the script prints the median of each and their ratio.
Goal: ratio <= 1.05 (the branch adds 4 tokens to each cross-attention layer).
"""

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


def random_adapter(pack, channels: int):
    adapters = pack.adapters
    layout = adapters.layers.SD15
    mult = {"down_blocks": [1, 2, 4], "up_blocks": [None, 4, 2, 1], "mid_block": [4]}
    widths = {}
    for layer in adapters.layers.cross_attention_layers(layout):
        block, index = layer.diffusers_name.split(".")[:2]
        widths[layer.checkpoint_number] = channels * mult[block][0 if block == "mid_block" else int(index)]
    projection = adapters.projections.MLPProjection(55, 768, 4)
    adapter = adapters.expression_adapter.ExpressionAdapter(projection, layout, widths)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.05)
    return adapter


def time_sampling(model, latent, positive, negative, steps: int) -> float:
    import comfy.model_management
    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 3.0, "dpmpp_2m", "normal", positive, negative, latent, disable_pbar=True, seed=1)
    comfy.model_management.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui")
    parser.add_argument("--channels", type=int, default=64, help="model channels (SD1.5: 320)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)

    comfyui = run.find_comfyui(args.comfyui)
    if comfyui is None:
        parser.error("no ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH")
    comfy_nodes = run.start_comfyui(comfyui, force_cpu=True if args.cpu else None)
    pack = run.load_pack(comfy_nodes, Path(tempfile.mkdtemp(prefix="expression_adapters_")))
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    plain = random_sd15_model(args.channels, device)
    adapter = random_adapter(pack, args.channels)
    with torch.no_grad():
        tokens = adapter.expression_tokens(torch.randn(1, 55))
        uncond = adapter.unconditional_tokens()
    patched = pack.nodes.cross_attention_patch.apply_cross_attention_branch(plain, adapter, tokens, uncond)

    latent = torch.zeros(1, 4, 64, 64)
    generator = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    time_sampling(plain, latent, positive, negative, 2)  # warm-up: model load, kernels
    time_sampling(patched, latent, positive, negative, 2)
    timings = {"without adapter": [], "with adapter": []}
    for _ in range(args.repeats):
        timings["without adapter"].append(time_sampling(plain, latent, positive, negative, args.steps))
        timings["with adapter"].append(time_sampling(patched, latent, positive, negative, args.steps))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(f"device {device}, SD1.5 structure with {args.channels} channels, 64x64 latent, {args.steps} steps, CFG 3, "
          f"{args.repeats} repeats")
    for name, value in medians.items():
        print(f"  {name:16s} median {value:.3f} s  (runs: {', '.join(f'{v:.3f}' for v in timings[name])})")
    print(f"ratio with/without: {medians['with adapter'] / medians['without adapter']:.3f}  (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
