"""Adapter load time: built with random init then ``load_state_dict`` (the old way) vs our loaders, side by side.

    python benchmarks/adapter_load.py [--repeats 3] [--threads N] [--only sd15|sdxl]

Two loads, each timed the old way and the new way in alternation, in one process:

- sd15: a full-size SD1.5 Expression Adapter file (768-d tokens, 320/640/1280-wide keys/values on the 16
  cross-attention layers, MLP projection 55 -> 1024 -> 4 x 768; float16 safetensors), read and loaded by
  ``ExpressionAdapter.from_file``; the old way reads the same file, builds the adapter (random init) and
  copies the weights in.
- sdxl: the two state dicts of an SDXL E-Adapter as ``EAdapter.from_published`` assembles it (ID branch: the
  FaceID MLP projection, 2048-d keys/values on all 70 layers; expression branch: the image projection, keys/values
  on all 70 layers; about 700 M numbers in all, float16 in memory as the published files are), loaded by
  ``IdentityBranch.from_state_dict`` / ``ExpressionBranch.from_state_dict``. No file: reading it would be the same
  on both sides.

Each way's parameters are checked: the given tensors, as float32 on the CPU. The script prints the median of each, and the ratio
old / new. The random init the new loaders skip is CPU work, so the thread count matters (printed).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.checkpoints import read_state_dict, split_prefix, write_safetensors  # noqa: E402
from adapters.e_adapter import ExpressionBranch, IdentityBranch  # noqa: E402
from adapters.expression_adapter import ExpressionAdapter  # noqa: E402
from adapters.layers import SD15, SDXL, UNetLayout, cross_attention_layers  # noqa: E402
from adapters.projections import projection_from_state_dict  # noqa: E402

LEVEL_WIDTHS = (320, 640, 1280, 1280)  # channels by resolution level (SDXL's attention starts at 640)


def full_width(layout: UNetLayout, layer) -> int:
    """The query width of a cross-attention layer of the real UNet."""
    block, index = layer.diffusers_name.split(".")[:2]
    if block == "mid_block":
        return 1280
    level = int(index) if block == "down_blocks" else len(layout.down_depths) - 1 - int(index)
    return LEVEL_WIDTHS[level]


def random_state(layout: UNetLayout, projection: dict[str, tuple[int, ...]], dtype, seed: int) -> dict[str, torch.Tensor]:
    """``image_proj.*`` of the given shapes plus ``ip_adapter.N.to_{k,v}_ip.weight`` at full width on every layer."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    token_dim = layout.context_dim
    state = {f"image_proj.{name}": draw(*shape) for name, shape in projection.items()}
    for layer in cross_attention_layers(layout):
        for kv in "kv":
            state[f"ip_adapter.{layer.checkpoint_number}.to_{kv}_ip.weight"] = draw(full_width(layout, layer), token_dim)
    return state


def mlp_projection(in_dim: int, hidden: int, token_dim: int) -> dict[str, tuple[int, ...]]:
    return {"proj.0.weight": (hidden, in_dim), "proj.0.bias": (hidden,), "proj.2.weight": (4 * token_dim, hidden),
            "proj.2.bias": (4 * token_dim,), "norm.weight": (token_dim,), "norm.bias": (token_dim,)}


def old_load(cls, state_dict: dict[str, torch.Tensor], layout: UNetLayout):
    """The loaders before: the adapter built as for training (random init), then the file's weights copied in."""
    projection = projection_from_state_dict(split_prefix(state_dict, "image_proj"))
    widths = {int(key.split(".")[0]): tensor.shape[0] for key, tensor in split_prefix(state_dict, "ip_adapter").items()
              if key.endswith("to_k_ip.weight")}
    adapter = cls(projection, layout, widths)
    adapter.load_state_dict(state_dict, strict=True)
    return adapter


def compare(name: str, old, new, expected: dict[str, torch.Tensor], repeats: int) -> None:
    """Old and new in alternation; each result checked against ``expected`` (float32 parameters on the CPU
    equal to the given tensors), then dropped before the next run."""
    seconds = {"old": [], "new": []}
    for _ in range(repeats):
        for way, run in (("old", old), ("new", new)):
            gc.collect()
            started = time.perf_counter()
            loaded = run()
            seconds[way].append(time.perf_counter() - started)
            if set(loaded) != set(expected) or not all(
                    tensor.dtype == torch.float32 and tensor.device.type == "cpu" and torch.equal(tensor, expected[key].float())
                    for key, tensor in loaded.items()):
                raise SystemExit(f"{name}: the {way} way did not load the given tensors as float32 on the CPU")
            del loaded
    old_median, new_median = statistics.median(seconds["old"]), statistics.median(seconds["new"])
    print(f"{name}: old (random init + load_state_dict) {old_median:.3f} s, new (no init) {new_median:.3f} s, "
          f"ratio old/new {old_median / new_median:.1f}x  (median of {repeats}; all: old "
          f"{', '.join(f'{s:.3f}' for s in seconds['old'])}; new {', '.join(f'{s:.3f}' for s in seconds['new'])})")


def parameters(**modules) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": tensor.detach() for prefix, module in modules.items() for key, tensor in module.named_parameters()}


def sd15(repeats: int) -> None:
    state = random_state(SD15, mlp_projection(55, 1024, SD15.context_dim), torch.float16, seed=0)
    count = sum(tensor.numel() for tensor in state.values())
    expected = {f"adapter.{key}": tensor for key, tensor in state.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "exp_adapter.safetensors"
        write_safetensors(state, path)
        print(f"SD1.5 Expression Adapter file: {count / 1e6:.1f} M numbers, {path.stat().st_size / 2**20:.0f} MiB (float16)")
        compare("sd15 Expression Adapter from_file",
                lambda: parameters(adapter=old_load(ExpressionAdapter, read_state_dict(path), SD15)),
                lambda: parameters(adapter=ExpressionAdapter.from_file(path)), expected, repeats)


def sdxl(repeats: int) -> None:
    identity = random_state(SDXL, mlp_projection(512, 1024, SDXL.context_dim), torch.float16, seed=1)
    expression = random_state(SDXL, {"proj.weight": (4 * SDXL.context_dim, 1024), "proj.bias": (4 * SDXL.context_dim,),
                                     "norm.weight": (SDXL.context_dim,), "norm.bias": (SDXL.context_dim,)}, torch.float16, seed=2)
    expected = {f"id.{key}": tensor for key, tensor in identity.items()} | {f"exp.{key}": tensor for key, tensor in expression.items()}
    print(f"SDXL E-Adapter state dicts (ID + expression branch): {sum(t.numel() for t in expected.values()) / 1e6:.0f} M "
          "numbers (float16)")
    compare("sdxl E-Adapter branches from_state_dict",
            lambda: parameters(id=old_load(IdentityBranch, identity, SDXL), exp=old_load(ExpressionBranch, expression, SDXL)),
            lambda: parameters(id=IdentityBranch.from_state_dict(identity), exp=ExpressionBranch.from_state_dict(expression)),
            expected, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--only", choices=("sd15", "sdxl"), default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if args.only in (None, "sd15"):
        sd15(args.repeats)
    if args.only in (None, "sdxl"):
        sdxl(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
