"""Sampling time in Reference Adapter mode vs base sampling, measured side by side in one process.

    python benchmarks/reference_overhead.py [--comfyui PATH] [--channels 64] [--repeats 3]
    python benchmarks/reference_overhead.py --flops          # FLOPs at full SD1.5 width

Same random ComfyUI UNet with the SD1.5 block structure (channels narrowed), 64x64 latent,
10 DPM++ 2M steps, CFG 3. The reference features are computed once per generation and reused at
every step; the script also times one Reference UNet pass and prints what a naive variant that
re-ran it at every step would cost (base-mode time plus one measured pass per step). Base runs come
first, then reference-mode runs (blocks, device synchronised), so ComfyUI merges the LoRA once; that
merge is printed on its own. ``--flops`` counts floating-point operations per step instead, and those
of the one Reference UNet pass (deterministic on any machine; 320 channels by default).
Goal, at full width on a GPU: ratio <= 1.35.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, compare_flops, compare_sampling, count_flops, random_sd15_model, start, timed  # noqa: E402


def random_lora(pack, channels: int, rank: int = 16):
    lora_module = pack.adapters.lora
    mult = {"down_blocks": [1, 2, 4], "up_blocks": [None, 4, 2, 1], "mid_block": [4]}
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name in lora_module.ReferenceLora.expected_modules():
        block, index = name.split(".")[:2]
        width = channels * mult[block][0 if block == "mid_block" else int(index)]
        modules[name] = lora_module.LoraWeights(torch.randn(rank, width, generator=generator) * 0.01,
                                                torch.randn(width, rank, generator=generator) * 0.01)
    return lora_module.ReferenceLora(modules)


def main(argv=None) -> int:
    args = arguments(__doc__, channels=64, repeats=3, argv=argv)
    pack = start(args.comfyui, args.cpu)
    import comfy.model_management

    plain = random_sd15_model(args.channels, comfy.model_management.get_torch_device())
    generator = torch.Generator().manual_seed(3)
    reference_latent = torch.randn(1, 4, 64, 64, generator=generator)
    id_context = torch.randn(1, 77, 768, generator=generator)
    capture = pack.hosts.comfyui.reference.capture_reference_features
    reference_mode, _ = pack.hosts.comfyui.reference.apply_reference_adapter(plain, random_lora(pack, args.channels),
                                                                            reference_latent, id_context, 0.8)
    positive = [[id_context, {}]]
    negative = [[torch.zeros_like(id_context), {}]]
    if args.flops:
        counts = compare_flops({"base": plain, "reference mode": reference_mode}, positive, negative, args)
        capture_flops = count_flops(lambda: capture(plain, reference_latent, id_context))
        ratio = counts["reference mode"][0] / counts["base"][0]
        print(f"one Reference UNet pass (once per generation): {capture_flops / 1e9:.2f} GFLOP")
        print(f"FLOP ratio reference/base per step: {ratio:.4f}; re-running the Reference UNet every step would "
              f"make it {(counts['reference mode'][0] + capture_flops) / counts['base'][0]:.4f}")
        return 0
    capture(plain, reference_latent, id_context)  # warm-up
    capture_seconds = timed(lambda: capture(plain, reference_latent, id_context))
    median = compare_sampling({"base": plain, "reference mode": reference_mode}, positive, negative, args)
    print(f"one Reference UNet pass: {capture_seconds:.3f} s")
    print(f"ratio reference/base: {median['reference mode'] / median['base']:.3f}  (goal <= 1.35)")
    naive = (median["reference mode"] + (args.steps - 1) * capture_seconds) / median["base"]
    print(f"naive per-step reference passes (estimated: one measured pass per step): {naive:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
