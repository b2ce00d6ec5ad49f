"""The E-Adapter's cost against base sampling: FLOPs at full SD1.5 width, wall clock at reduced width.

    python benchmarks/e_adapter_overhead.py [--comfyui PATH] [--channels 64] [--repeats 5] [--no-flops]

1. FLOP ratio: one UNet evaluation (CFG batch of 2, 64x64 latent, 77 text tokens) of a ComfyUI UNet with
   the full SD1.5 structure and width (320 channels, random weights), counted by
   ``torch.utils.flop_counter.FlopCounterMode`` with and without the E-Adapter (ID branch on all 16
   layers, expression branch on all 16: 8 extra tokens per layer). Attention runs on torch's math
   kernel here so the counter sees its matrix products. The branches' keys/values are constant within
   a sampling run and projected once (first step); the ratio counts a later step, and the one-off cost
   is printed beside it. Goal: <= 1.06.
2. Wall clock on this machine's CPU at REDUCED width (--channels, default 64; not real SD1.5 speed):
   10 DPM++ 2M steps, runs alternating, medians and their ratio (benchmarks/common.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, compare_sampling, random_sd15_model, start  # noqa: E402

SD15_LEVELS = {"down_blocks": [1, 2, 4], "up_blocks": [None, 4, 2, 1], "mid_block": [4]}


def random_e_adapter(pack, channels: int):
    """An E-Adapter with random weights for an SD1.5-structured UNet of ``channels`` channels."""
    adapters = pack.adapters
    layout = adapters.layers.SD15
    widths = {}
    for layer in adapters.layers.cross_attention_layers(layout):
        block, index = layer.diffusers_name.split(".")[:2]
        widths[layer.checkpoint_number] = channels * SD15_LEVELS[block][0 if block == "mid_block" else int(index)]
    module = adapters.e_adapter
    torch.manual_seed(0)
    identity = module.IdentityBranch(adapters.projections.MLPProjection(512, 768, 4), layout, widths)
    expression = module.ExpressionBranch(adapters.projections.TokenProjection(1024, 768, 4), layout, widths)
    with torch.no_grad():
        for parameter in [*identity.parameters(), *expression.parameters()]:
            parameter.normal_(0, 0.05)
    return module.EAdapter(identity, expression).eval()


def patched_model(pack, plain, adapter):
    id_embedding = F.normalize(torch.randn(1, 512), dim=-1)
    return pack.nodes.e_adapter_nodes.apply_e_adapter(plain, adapter, id_embedding, torch.randn(1, 1024))


def count_flops(model, x, sigma, context) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    options = dict(model.model_options["transformer_options"])
    options["cond_or_uncond"] = [1, 0]
    options["sigmas"] = sigma
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
    return counter.get_total_flops()


def flop_ratio(pack, device) -> None:
    import comfy.model_management

    plain = random_sd15_model(320, device)
    patched = patched_model(pack, plain, random_e_adapter(pack, 320))
    comfy.model_management.load_models_gpu([plain])
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 64, 64, generator=generator).to(device)
    context = torch.randn(2, 77, 768, generator=generator).to(device)
    sigma = torch.full((2,), 5.0, device=device)
    base = count_flops(plain, x, sigma, context)
    first = count_flops(patched, x, sigma, context)  # projects and caches the branches' keys/values
    later = count_flops(patched, x, sigma, context)
    print(f"FLOPs per UNet evaluation, full SD1.5 width (320 channels), CFG batch 2, 64x64 latent: base {base / 1e9:.1f} G, "
          f"with E-Adapter {later / 1e9:.1f} G -> ratio {later / base:.4f} (goal <= 1.06)")
    print(f"  one-off keys/values projection on the first step: {(first - later) / 1e6:.1f} MFLOPs "
          f"({(first - later) / base * 100:.3f} % of one evaluation), then cached for the sampling run")
    comfy.model_management.unload_all_models()  # free the full-width UNet before the wall-clock part


def main(argv=None) -> int:
    args = arguments(__doc__, channels=64, repeats=5, argv=[a for a in (argv or sys.argv[1:]) if a != "--no-flops"])
    pack = start(args.comfyui, args.cpu)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if "--no-flops" not in (argv or sys.argv[1:]):
        flop_ratio(pack, device)
    plain = random_sd15_model(args.channels, device)
    patched = patched_model(pack, plain, random_e_adapter(pack, args.channels))
    generator = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    print(f"wall clock at REDUCED width ({args.channels} channels; real SD1.5 has 320), on {device}:")
    median = compare_sampling({"without adapter": plain, "with E-Adapter": patched}, positive, negative, args)
    print(f"ratio with/without: {median['with E-Adapter'] / median['without adapter']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
