"""``python -m training.upscale``: super-resolve prepared or IDI shards, for EmojiDiff's SDXL stages.

    python -m training.upscale data/idi_shards/manifest.json --out data/idi_shards_1024 \\
        --model models/upscale_models/SwinIR_x2.pth --resolution 1024 \\
        [--vae models/sdxl-vae-fp16-fix] [--device cuda]

EmojiDiff's SDXL data is its IDI data "super-resolved using SwinIR to 1024x1024" ([ED §4], supplementary
B.1). The model is any single-image model ``spandrel`` loads (the library ComfyUI's upscaler loader uses):
SwinIR, ESRGAN, HAT, ...; give the file you use in ComfyUI's ``models/upscale_models``. Each sample's
training crop and its ``reference.png`` (IDI's synthetic picture) go through the model and are then resized
(area, or cubic when the model's output is smaller) to exactly ``--resolution``. Everything else is copied:
landmarks are stored normalised to the crop, embeddings, masks and ``local.jpg`` (already embedded) do not
depend on the crop's size. Latents belong to the old size and VAE: with ``--vae`` (SDXL's) they are
computed again from the upscaled crop, otherwise left out (train with ``data.use_cached_latents: false``).

Shards keep their names and samples; finished shards are skipped on a rerun, as in prepare.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .annotate import LatentAnnotator, Sample
from .data import IMAGE_FIELDS
from .prepare import PLAN, finish
from .shards import (
    ShardWriter,
    load_index,
    npy_bytes,
    read_sample,
    shard_name,
    sidecar_path,
    write_json_atomic,
)

logger = logging.getLogger("training.upscale")
UPSCALED_FILES = ("reference.png",)  # besides the crop: full-size pictures of the sample
LATENT_FIELDS = ("latent_mean.npy", "latent_std.npy")


def load_upscaler(path, device="cpu"):
    """spandrel's model descriptor for an image-to-image file (.pth, .safetensors, ...), in eval mode."""
    from spandrel import ImageModelDescriptor, ModelLoader

    if not Path(path).is_file():
        raise FileNotFoundError(f"upscale model {path} not found: give a SwinIR (or other spandrel) model file")
    model = ModelLoader(device).load_from_file(str(path))
    if not isinstance(model, ImageModelDescriptor) or model.input_channels != 3:
        raise ValueError(f"{path} is a {model.architecture.name} model, not an RGB image-to-image upscaler")
    return model.eval()


@torch.no_grad()
def upscale_image(model, rgb: np.ndarray, resolution: int) -> np.ndarray:
    """H x W x 3 uint8 -> ``resolution`` square uint8, through the model, then resized to the exact size."""
    import cv2

    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    # the descriptor pads to the model's size multiple and crops the padding off again
    output = model(pixels.to(model.device)).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
    if output.shape[:2] != (resolution, resolution):
        shrink = output.shape[0] > resolution
        output = cv2.resize(output, (resolution, resolution), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return (output * 255).round().clip(0, 255).astype(np.uint8)


def decode_rgb(data: bytes) -> np.ndarray:
    import cv2

    return np.ascontiguousarray(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1])


def encode_rgb(rgb: np.ndarray, suffix: str) -> bytes:
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix == "jpg" else []
    ok, data = cv2.imencode(f".{suffix}", np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise RuntimeError(f"could not encode a .{suffix} picture")
    return data.tobytes()


def upscale_sample(files: dict, model, resolution: int, latents: LatentAnnotator | None) -> dict[str, bytes]:
    """One sample's members with the crop and its full-size pictures upscaled and the latents redone or dropped."""
    out = {field: data for field, data in files.items() if field != "__key__" and field not in LATENT_FIELDS}
    crop_field = next(field for field in IMAGE_FIELDS if field in files)
    crop = upscale_image(model, decode_rgb(files[crop_field]), resolution)
    out[crop_field] = encode_rgb(crop, crop_field)
    for name in UPSCALED_FILES:
        if name in files:
            out[name] = encode_rgb(upscale_image(model, decode_rgb(files[name]), resolution), name.rsplit(".", 1)[1])
    if latents is not None:
        sample = Sample(crop, {}, crop=crop)
        latents(sample)
        for name, array in sample.arrays.items():
            out[f"{name}.npy"] = npy_bytes(array)
    return out


def upscale_shards(source, out, model, resolution: int, vae=None, device="cpu", settings: dict | None = None) -> dict:
    """Upscale every shard of ``source`` into ``out``; returns prepare's report (manifest once all are done)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_index(source)
    write_json_atomic({"settings": dict(settings or {}, resolution=resolution, source=str(source)),
                       "shards": [record["shard"] for record in records]}, out / PLAN)
    latents = vae_config = None
    if vae is not None:
        latents = LatentAnnotator(vae, device)
        vae_config = {"scaling_factor": float(vae.config.scaling_factor),
                      "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0)}
    for k, record in enumerate(records):
        target = out / shard_name(k)
        if sidecar_path(target).is_file():
            continue
        writer = ShardWriter(target)
        try:
            for position, sample in enumerate(record["samples"]):
                info = {key: value for key, value in sample.items() if key not in ("key", "members")}
                writer.add(sample["key"], upscale_sample(read_sample(record, position), model, resolution, latents), info)
        except BaseException:
            writer.abort()
            raise
        fields = sorted({field for s in writer.samples for field in s["members"]})
        notes = list(record.get("notes", [])) + [f"upscaled to {resolution} ({settings or {}})"]
        if latents is None and any(set(LATENT_FIELDS) & set(s["members"]) for s in record["samples"]):
            notes.append("latents left out (they were the old size's): give --vae, or data.use_cached_latents: false")
        writer.close({"items": record.get("items", len(record["samples"])), "skipped": record.get("skipped", []),
                      "fields": fields, "notes": notes, "vae": vae_config, "source_shard": record["path"]})
        logger.info("upscaled %s (%d samples)", target.name, len(writer.samples))
    return finish(out, len(records))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.upscale", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a manifest.json, a shard folder or a glob of shards (prepare's or IDI's)")
    parser.add_argument("--out", required=True, help="output folder for the upscaled shards")
    parser.add_argument("--model", required=True, help="SwinIR (or any spandrel image model) file")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--vae", help="diffusers AutoencoderKL folder (SDXL's): latents of the upscaled crops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_upscaler(args.model, args.device)
    vae = None
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True)
    settings = {"model": Path(args.model).name, "architecture": model.architecture.name, "scale": model.scale}
    report = upscale_shards(args.source, args.out, model, args.resolution, vae, args.device, settings)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped_files"}, indent=1))
    return report


if __name__ == "__main__":
    main()
