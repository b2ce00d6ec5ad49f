"""EmojiDiff's style-leakage check (spec E12): how far a style change of the expression picture moves the UNet's
output when the expression branch sits only in ``up_blocks.0.attentions.1`` versus in all 70 SDXL layers.

    python benchmarks/e_adapter_style_leakage.py [--seed 0] [--samples 4]

EmojiDiff injects expression only in SDXL's "Up 0.1" so that the expression picture's style (lighting, skin, colour)
does not leak into the output ([ED 3.2, 4 Implementation], Fig. 8). InstantStyle found that very block to carry
style, so the claim is open (spec E12). This script measures, side by side in one run, with the E-Adapter's own
layer selection (``EAdapter.named_adapters(layer_set)``) on the diffusers host:

1. the relative change of the noise prediction, ||eps(changed) - eps(original)|| / ||eps(original)||, for a
   colour shift and for a texture added to the expression picture, and, for scale, for an expression change (the
   mouth opened), under each layer set; and the ratio restricted / all;
2. how many of the 70 cross-attention layers see their attention output change at all: with the branch only in
   ``up_blocks.0.attentions.1``, the 44 layers that run before it (down 24, mid 10, ``up_blocks.0.attentions.0``
   10) cannot, and only the block and those after it (10 + 10 + 6 = 26) can.

What it shows: the mechanism. Confining the branch to one block cuts the paths by which anything in the expression
picture reaches the output, so a style change moves the output less than with the branch on every layer.

What it does not show: anything about the published or trained weights. The models are the tests' stand-ins (a
tiny SDXL-shaped UNet, a tiny random CLIP vision model, random IP-Adapter-layout files from
``tests/support/e_adapter_standins.py``). Random weights have no notion of style or expression, so the same reduction
applies to the expression change too; whether the trained ``up_blocks.0.attentions.1`` keeps expression while
dropping style (EmojiDiff's claim) or carries style (InstantStyle's finding) needs the real SDXL, CLIP ViT-H and a
trained E-Adapter, and pictures scored with the evaluation metrics (the style/expression column below is printed
for that use; on stand-ins it means nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from adapters.e_adapter import EAdapter  # noqa: E402
from hosts.diffusers import attach_adapters  # noqa: E402
from support.e_adapter_standins import write_published  # noqa: E402
from support.tiny_unets import CONTEXT_DIM, diffusers_unet, sdxl_added_conditions  # noqa: E402
from training.tiny import tiny_clip_vision  # noqa: E402

LAYER_SETS = {"all layers": "all", "up_blocks.0.attentions.1": "emojidiff_expression_sdxl"}
CHANGES = ("colour", "texture", "expression")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def face_picture(size: int = 64, mouth_open: bool = False) -> np.ndarray:
    """A schematic face (RGB uint8): skin oval, eyes, brows, a closed or open mouth, on a grey background."""
    import cv2

    picture = np.full((size, size, 3), 128, np.uint8)
    s = size / 64
    cv2.ellipse(picture, (int(32 * s), int(34 * s)), (int(20 * s), int(26 * s)), 0, 0, 360, (224, 180, 150), -1)
    for x in (24, 40):
        cv2.circle(picture, (int(x * s), int(28 * s)), int(3 * s), (40, 30, 30), -1)
        cv2.line(picture, (int((x - 5) * s), int(22 * s)), (int((x + 5) * s), int(22 * s)), (70, 50, 40), max(1, int(s)))
    height = 6 if mouth_open else 1
    cv2.ellipse(picture, (int(32 * s), int(46 * s)), (int(8 * s), int(height * s)), 0, 0, 360, (150, 40, 50), -1)
    return picture


def colour_shift(rgb: np.ndarray) -> np.ndarray:
    """A warm, brighter grade: the kind of lighting and colour difference the paper calls style."""
    return np.clip(rgb.astype(np.float32) * [1.2, 1.0, 0.7] + [20, 10, 0], 0, 255).astype(np.uint8)


def texture(rgb: np.ndarray, seed: int) -> np.ndarray:
    """A fixed high-frequency grain over the whole picture (skin texture, film grain)."""
    grain = np.random.default_rng(seed).normal(0, 25, rgb.shape[:2])[..., None]
    return np.clip(rgb.astype(np.float32) + grain, 0, 255).astype(np.uint8)


def clip_embeds(model, pictures: list[np.ndarray]) -> torch.Tensor:
    """CLIP vision ``image_embeds`` as the E-Adapter takes them (resized to the model's size, CLIP's mean/std)."""
    size = model.config.image_size
    pixels = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255.0
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    pixels = (pixels - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
    with torch.no_grad():
        return model(pixel_values=pixels).image_embeds


def stand_ins(seed: int):
    """The tests' stand-ins: a tiny SDXL-shaped UNet, a tiny CLIP vision model, an E-Adapter assembled from random
    published-layout IP-Adapter files (every layer present, so any layer set can be selected)."""
    with tempfile.TemporaryDirectory() as folder:
        adapter = EAdapter.from_published(*write_published(Path(folder), "SDXL", lora_rank=None)).eval()
    return diffusers_unet("SDXL", seed=seed), tiny_clip_vision({"seed": seed}), adapter


def measure(seed: int = 0, samples: int = 4) -> dict:
    """Per layer set: the relative output change of each picture change, and the number of layers whose attention
    output moved under the colour shift (of all with a branch)."""
    unet, clip, adapter = stand_ins(seed)
    original = face_picture()
    pictures = {"original": original, "colour": colour_shift(original), "texture": texture(original, seed),
                "expression": face_picture(mouth_open=True)}
    embeds = dict(zip(pictures, clip_embeds(clip, list(pictures.values())), strict=True))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, 8, 8, generator=generator)
    t = torch.linspace(900, 100, samples).long()
    text = torch.randn(samples, 8, CONTEXT_DIM, generator=generator)
    added, _ = sdxl_added_conditions(unet, samples, seed=seed + 1)
    with torch.no_grad():
        id_tokens = adapter.id_tokens(F.normalize(torch.randn(1, 512, generator=generator), dim=-1)).expand(samples, -1, -1)
        exp_tokens = {name: adapter.expression_tokens(e[None]).expand(samples, -1, -1) for name, e in embeds.items()}
    results = {}
    for label, layer_set in LAYER_SETS.items():
        attach_adapters(unet, adapter.named_adapters(layer_set))
        outputs, records = {}, {}
        for name, tokens in exp_tokens.items():
            records[name] = {}
            with torch.no_grad():
                outputs[name] = unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added, cross_attention_kwargs={
                    "adapter_tokens": {"id": id_tokens, "expression": tokens}, "attention_record": records[name]}).sample
        base = outputs["original"]
        moved = [layer for layer, out in records["original"].items()
                 if not torch.allclose(records["colour"][layer], out, rtol=0, atol=1e-6)]
        results[label] = {"change": {c: float((outputs[c] - base).norm() / base.norm()) for c in CHANGES},
                          "layers_moved": len(moved), "layers": len(records["original"]), "moved": sorted(moved)}
    return results


def report(results: dict) -> None:
    all_layers, restricted = (results[label] for label in LAYER_SETS)
    print("relative change of the noise prediction, ||eps(changed) - eps(original)|| / ||eps(original)||")
    print(f"  {'expression branch on':28s}" + "".join(f"{c:>12s}" for c in CHANGES) + "   layers moved (colour)")
    for label, result in results.items():
        print(f"  {label:28s}" + "".join(f"{result['change'][c]:12.5f}" for c in CHANGES)
              + f"   {result['layers_moved']} of {result['layers']}")
    print(f"  {'ratio restricted / all':28s}"
          + "".join(f"{restricted['change'][c] / all_layers['change'][c]:12.3f}" for c in CHANGES))
    for label, result in results.items():
        print(f"  style/expression ({label}): colour {result['change']['colour'] / result['change']['expression']:.3f}, "
              f"texture {result['change']['texture'] / result['change']['expression']:.3f} "
              "(random stand-in weights: not EmojiDiff's claim, see the docstring)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=4, help="noisy latents (timesteps 900..100) per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: per-op overhead dominates, threads only contend
    print(f"stand-in models (tiny SDXL-shaped UNet, random CLIP vision and E-Adapter), seed {args.seed}, "
          f"{args.samples} noisy latents")
    report(measure(args.seed, args.samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
