"""FaceCrafter Guider (four predictions, paper Eq. 6) vs plain CFG (two) on the same FaceCrafter model and steps.

    python benchmarks/facecrafter_guider.py [--comfyui PATH] [--channels 64] [--repeats 3] [--steps 10] [--cpu] [--skip-flops]

1. UNet work per step at full SD1.5 width (320 channels, 64x64 latent), counted by
   ``torch.utils.flop_counter.FlopCounterMode`` over one sampling step of each guider, attention
   included (run through torch's math SDPA backend, which the counter sees).
   Limit 2.0 (four predictions instead of two); goal <= 2.1.
2. Wall clock over whole samplings at REDUCED width (--channels, default 64: not SD1.5's speed),
   runs interleaved, medians printed. On a busy CPU read it as a rough check of (1).
Both use a random SD1.5-structured UNet and a random default-size FaceCrafter (LMK + EMO), whose
tokens and keys/values are computed once per sampling run, not per step.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, random_sd15_model, start  # noqa: E402

SAMPLER = "ddpm"  # the paper's sampler


def random_facecrafter(pack, channels: int):
    facecrafter = pack.adapters.facecrafter
    mult = {"down_blocks": [1, 2, 4], "up_blocks": [None, 4, 2, 1], "mid_block": [4]}
    widths = {}
    for layer in pack.adapters.layers.cross_attention_layers(pack.adapters.layers.SD15):
        block, index = layer.diffusers_name.split(".")[:2]
        widths[layer.checkpoint_number] = channels * mult[block][0 if block == "mid_block" else int(index)]
    torch.manual_seed(0)
    crafter = facecrafter.FaceCrafter(widths=widths)
    with torch.no_grad():
        for module in crafter.modules_present().values():
            for branch in module.kv.values():
                branch.to_v_ip.weight.normal_(0.0, 0.02)
    return crafter.eval()


def patched_model(pack, channels: int):
    import comfy.model_management

    model = random_sd15_model(channels, comfy.model_management.get_torch_device())
    crafter = random_facecrafter(pack, channels)
    with torch.no_grad():
        lmk = crafter.landmark_tokens(torch.rand(1, 3, 512, 512))
        emo = crafter.emotion_tokens(torch.rand(1, 10))
    return pack.hosts.comfyui.facecrafter.apply_facecrafter(model, crafter, lmk, emo)


def guiders(pack, model):
    import comfy.samplers

    generator = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    cfg = comfy.samplers.CFGGuider(model)
    cfg.set_conds(positive, negative)
    cfg.set_cfg(2.5)
    [facecrafter] = pack.nodes.facecrafter_nodes.FaceCrafterGuider.execute(model, positive, negative, 2.5, 2.0, 2.0).result
    return {"plain CFG (2 predictions)": cfg, "FaceCrafter Guider (4)": facecrafter}


def sample(model, guider, steps: int) -> float:
    import comfy.model_management
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object(SAMPLER), sigmas, disable_pbar=True, seed=1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    comfy.model_management.soft_empty_cache()
    return elapsed


def flops_per_step(pack) -> dict[str, int]:
    """FLOPs of one sampling step at full SD1.5 width (the first step also projects K/V once: counted apart)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = patched_model(pack, 320)
    counts = {}
    for name, guider in guiders(pack, model).items():
        totals = []
        for steps in (1, 2):  # step 2 minus step 1 = one step without the once-per-run work
            # FlopCounterMode has no formula for the CPU's fused attention kernel; the math backend is counted
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                sample(model, guider, steps)
            totals.append(counter.get_total_flops())
        counts[name] = totals[1] - totals[0]
        counts[f"{name}, once per run"] = 2 * totals[0] - totals[1]  # keys/values of the module tokens
    return counts


def main(argv=None) -> int:
    skip_flops = "--skip-flops" in (argv if argv is not None else sys.argv[1:])  # the FLOP count takes long on a CPU
    args = arguments(__doc__, channels=64, repeats=3, argv=[a for a in (argv if argv is not None else sys.argv[1:]) if a != "--skip-flops"])
    pack = start(args.comfyui, args.cpu)
    import comfy.model_management

    if not skip_flops:
        flops = flops_per_step(pack)
        cfg, guided = flops["plain CFG (2 predictions)"], flops["FaceCrafter Guider (4)"]
        print("UNet work per step at full SD1.5 width (320 channels), 64x64 latent, FlopCounterMode:")
        for name, value in flops.items():
            print(f"  {name:40s} {value / 1e9:10.1f} GFLOP")
        print(f"  ratio guider / CFG: {guided / cfg:.3f}  (limit 2.0: four predictions instead of two; goal <= 2.1)")

    model = patched_model(pack, args.channels)
    timed = guiders(pack, model)
    for guider in timed.values():
        sample(model, guider, 2)  # warm-up
    runs = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, guider in timed.items():
            runs[name].append(sample(model, guider, args.steps))
    print(f"wall clock at REDUCED width ({args.channels} channels, not SD1.5 speed), device "
          f"{comfy.model_management.get_torch_device()}, 64x64 latent, {args.steps} {SAMPLER} steps, {args.repeats} repeats:")
    for name, values in runs.items():
        print(f"  {name:28s} median {statistics.median(values):.3f} s  (runs: {', '.join(f'{v:.3f}' for v in values)})")
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"  ratio guider / CFG: {medians['FaceCrafter Guider (4)'] / medians['plain CFG (2 predictions)']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
