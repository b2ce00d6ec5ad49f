"""Sampling time with the Expression Adapter vs without, measured side by side in one process.

    python benchmarks/expression_adapter_overhead.py [--comfyui PATH] [--channels 64] [--repeats 5]
    python benchmarks/expression_adapter_overhead.py --flops          # FLOPs at full SD1.5 width

A ComfyUI UNet with the full SD1.5 block structure (channels narrowed by --channels; 320 is real
SD1.5), random weights, a 64x64 latent, 10 DPM++ 2M steps with CFG 3. The plain model's runs come
first, then the patched model's (blocks, device synchronised); the script prints the median of each
and their ratio, and the time spent inside the branch itself. ``--flops`` counts floating-point
operations per step instead (deterministic on any machine; 320 channels by default).
Goal, at full width on a GPU: ratio <= 1.05 (the branch adds 4 tokens to each cross-attention layer).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    arguments,
    compare_flops,
    compare_sampling,
    random_sd15_model,
    start,
    synchronize,
    time_sampling,
)


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


def main(argv=None) -> int:
    args = arguments(__doc__, channels=64, repeats=5, argv=argv)
    pack = start(args.comfyui, args.cpu)
    import comfy.model_management

    plain = random_sd15_model(args.channels, comfy.model_management.get_torch_device())
    adapter = random_adapter(pack, args.channels)
    with torch.no_grad():
        tokens = adapter.expression_tokens(torch.randn(1, 55))
        uncond = adapter.unconditional_tokens()
    patched = pack.hosts.comfyui.cross_attention.apply_cross_attention_branch(plain, adapter, tokens, uncond)
    generator = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    if args.flops:
        counts = compare_flops({"without adapter": plain, "with adapter": patched}, positive, negative, args)
        ratio = counts["with adapter"][0] / counts["without adapter"][0]
        print(f"FLOP ratio with/without per step: {ratio:.4f}  (the 4 extra tokens per cross-attention layer)")
        return 0
    median = compare_sampling({"without adapter": plain, "with adapter": patched}, positive, negative, args)
    print(f"ratio with/without: {median['with adapter'] / median['without adapter']:.3f}  (goal <= 1.05)")
    branch = branch_seconds(pack, patched, positive, negative, args)
    print(f"time inside the expression branch during one sampling: {branch:.3f} s, so ratio from the branch's own time: "
          f"{1 + branch / median['without adapter']:.3f} (steadier than the wall-clock ratio on a busy machine)")
    return 0


def branch_seconds(pack, patched, positive, negative, args) -> float:
    """Seconds spent in the branch itself during one sampling: each patch call minus the attention it wraps."""
    patch_module = pack.hosts.comfyui.cross_attention
    original = patch_module.BranchPatch.__call__
    spent = [0.0]

    def timed(self, q, k, v, extra_options):
        # synchronised: GPU kernels run asynchronously, and an unsynchronised timer measures their launch
        synchronize()
        started = time.perf_counter()
        self.attention_before(q, k, v, extra_options)
        synchronize()
        wrapped = time.perf_counter()
        out = original(self, q, k, v, extra_options)
        synchronize()
        spent[0] += max(0.0, (time.perf_counter() - wrapped) - (wrapped - started))
        return out

    patch_module.BranchPatch.__call__ = timed
    try:
        time_sampling(patched, torch.zeros(1, 4, 64, 64), positive, negative, args.steps)
    finally:
        patch_module.BranchPatch.__call__ = original
    return spent[0]


if __name__ == "__main__":
    sys.exit(main())
