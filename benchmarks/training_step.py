"""Expression Adapter training step: cached latents vs VAE encoding every step, steps/s, parameter counts.

    python benchmarks/training_step.py [--model tiny|sd15] [--resolution 64] [--batch-size 4]
                                       [--repeats 10] [--device cpu|cuda] [--mixed-precision no|fp16|bf16]

``tiny`` is the smoke config (random tiny UNet, VAE and ID encoder; CPU in seconds). ``sd15``
builds the real shapes with random weights (SD1.5 UNet 860M, SD VAE 84M, a 12-layer 768-wide
CLIP text encoder as Arc2Face's ID encoder) and is meant for a GPU at --resolution 512
--batch-size 8 --mixed-precision fp16. Data: real pictures (scikit-image's astronaut, insightface's
t1.jpg) cut into crops and written as training shards with the real shard writer; their latents
are the VAE's, computed by the same annotator training.prepare uses. The ID and expression
vectors are random: annotation is not what is measured here.

One trainer takes optimizer steps on one batch with cached latents and with VAE encoding,
alternating, so both see the same machine state; the script prints the median of each and their
ratio, then times the real training loop (``Trainer.run``, data loading included) for steps/s,
and prints trainable vs total parameter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.annotate import LatentAnnotator, Sample  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import ShardDataset, collate  # noqa: E402
from training.prepare import Options, encode_sample  # noqa: E402
from training.shards import MANIFEST, ShardWriter, shard_name, write_json_atomic  # noqa: E402
from training.tiny import tiny_vae  # noqa: E402
from training.train import Trainer  # noqa: E402

SD15 = {
    "tiny_unet": {"seed": 0, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "sample_size": 64},
    "tiny_vae": {"seed": 0, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                 "sample_size": 512},
    "tiny_id_encoder": {"seed": 0, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072},
}


def pictures() -> list[np.ndarray]:
    from skimage import data

    images = [data.astronaut()]
    try:
        import cv2
        import insightface

        t1 = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
        images.append(np.ascontiguousarray(t1[:, :, ::-1]))
    except ImportError:
        pass
    return images


def write_shards(folder: Path, models: dict, resolution: int, count: int, id_dim: int, per_shard: int = 8) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    vae = tiny_vae(models["tiny_vae"])
    annotator = LatentAnnotator(vae)
    options = Options(out=str(folder), insightface="", smirk="", image_format="jpg")
    sources = pictures()
    names = []
    for shard in range((count + per_shard - 1) // per_shard):
        writer = ShardWriter(folder / shard_name(shard))
        for k in range(min(per_shard, count - shard * per_shard)):
            image = sources[(shard * per_shard + k) % len(sources)]
            side = int(min(image.shape[:2]) * rng.uniform(0.5, 1.0))
            y, x = rng.integers(0, image.shape[0] - side + 1), rng.integers(0, image.shape[1] - side + 1)
            crop = cv2.resize(image[y:y + side, x:x + side], (resolution, resolution), interpolation=cv2.INTER_AREA)
            sample = Sample(image, {"source": "benchmark"}, crop=np.ascontiguousarray(crop))
            sample.arrays["id"] = (lambda v: v / np.linalg.norm(v))(rng.normal(size=id_dim).astype(np.float32))
            sample.arrays["flame"] = rng.normal(scale=0.5, size=55).astype(np.float32)
            annotator(sample)
            writer.add(f"b{shard:04d}-{k:03d}", encode_sample(sample, options))
        names.append(writer.close({"items": per_shard, "skipped": [], "fields": []})["shard"])
    write_json_atomic({"format": 1, "shards": names}, folder / MANIFEST)
    return folder / MANIFEST


def one_step(trainer: Trainer, batch) -> float:
    """One optimizer step of the stage exactly as Trainer.run takes it; returns seconds."""
    accelerator, module = trainer.accelerator, trainer.module
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with accelerator.accumulate(module):
        loss = trainer.stage.loss(module, batch, trainer.generator)
        accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (tiny) or 512 (sd15)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per mode, alternating")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (accelerate picks the GPU when present)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models run best on one)")
    args = parser.parse_args(argv)
    resolution = args.resolution or (64 if args.model == "tiny" else 512)
    models = SD15 if args.model == "sd15" else {"tiny_unet": {"seed": 0}, "tiny_vae": {"seed": 0},
                                                  "tiny_id_encoder": {"seed": 0, "hidden_size": 32}}
    # ID vectors are zero-padded to the encoder width, as ArcFace's 512 are to Arc2Face's 768
    id_dim = 512 if args.model == "sd15" else 16
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        os.environ["ACCELERATE_USE_CPU"] = "true"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_shards(tmp / "shards", models, resolution, 4 * args.batch_size, id_dim)
        overrides = [f"data.shards={manifest}", f"output_dir={tmp / 'run'}", f"data.resolution={resolution}",
                     f"train.batch_size={args.batch_size}", f"train.max_steps={args.repeats + 2}",
                     f"train.mixed_precision={args.mixed_precision}", "checkpointing.every_steps=0",
                     "sampling.every_steps=0", "logging.progress_bar=false", "logging.tensorboard=false",
                     "checkpointing.resume=none", "train.cpu_threads=null"]
        overrides += [f"model.{name}={json.dumps(block)}" for name, block in models.items()]
        trainer = Trainer(load_config(ROOT / "training/configs/smoke.yaml", overrides))
        # 1. the step alone, cached latents vs VAE encoding, alternating on one batch
        both = ShardDataset(trainer.dataset.records, ("id", "flame"), resolution, load_image=True, load_latents=True)
        batch = collate([both[i] for i in range(args.batch_size)])
        cached = {k: v for k, v in batch.items() if k != "pixels"}
        encoding = {k: v for k, v in batch.items() if not k.startswith("latent_")}
        times = {"cached": [], "vae": []}
        for repeat in range(args.repeats + 2):
            for name, b in (("cached", cached), ("vae", encoding)):
                seconds = one_step(trainer, b)
                if repeat >= 2:  # the first steps warm up
                    times[name].append(seconds)
        # 2. the whole loop (data loading included) on cached latents, as the smoke config trains
        stamps = []
        trainer.run(lambda step, loss: stamps.append(time.perf_counter()))
        loop = statistics.median([b - a for a, b in zip(stamps, stamps[1:])][1:])
        device = str(trainer.accelerator.device)
    step_cached, step_vae = statistics.median(times["cached"]), statistics.median(times["vae"])
    print(f"model {args.model}, {resolution}px, batch {args.batch_size}, device {device}, mixed precision "
          f"{args.mixed_precision}, {args.repeats} alternating repeats (medians)")
    print(f"step, cached latents:        {step_cached * 1000:9.1f} ms")
    print(f"step, VAE encode each step:  {step_vae * 1000:9.1f} ms")
    print(f"ratio VAE-every-step/cached: {step_vae / step_cached:9.2f}")
    print(f"training loop (Trainer.run, cached latents): {1 / loop:.2f} steps/s ({loop * 1000:.1f} ms/step)")
    print(f"parameters: trainable {trainer.trainable_parameters:,} of {trainer.total_parameters:,} "
          f"({100 * trainer.trainable_parameters / trainer.total_parameters:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
