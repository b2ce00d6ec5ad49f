"""``python -m training.idi --config training/configs/emojidiff_idi.yaml``: EmojiDiff's ID-irrelevant Data Iteration.

Stage II ([P §3.3], spec A2). For each real image X of person k (a prepared sample with ``faceid``,
``clip_image``, ``landmarks`` and ``blendshapes``):

1. P = a random real portrait of another person k' (drawn per X from ``idi.seed``);
2. Y0 = the base E-Adapter's picture with P's identity and X's expression (CLIP embedding of X's local
   image), through the diffusers host (training/sampling.py's DPM-Solver++ loop with CFG);
3. Y = ``swapper.swap(source=P, target=Y0)``: a portrait of k' with, ideally, X's expression;
4. kept when Exp mean <= ``idi.max_exp_mean`` and LMS <= ``idi.max_lms`` between X and Y, both from
   MediaPipe ([ED supp B.1]: 0.05 and 0.18); a Y without a face is dropped too.

A kept pair becomes one cross-identity triplet sample, written as training.prepare writes samples
(``idi.synthetic_role``):

- ``reference`` (spec A2's reading): S = another real image of k (another expression), R = Y, D = X. The
  sample holds D's crop, latents, landmarks and blendshapes, S's ``faceid``, and Y's local image and its
  ``clip_image`` (``idi.clip_vision``); ``reference.png`` is Y itself.
- ``target``: S = P, R = X, D = Y (Y's crop, latents from the VAE, MediaPipe fields; P's ``faceid``;
  X's ``clip_image``).

Output shard k covers rows k x items_per_shard onwards; process i of N (``RANK``/``WORLD_SIZE`` under
torchrun) writes the shards with k mod N = i. Every draw is seeded by (seed, row), so a rerun after a
kill skips finished shards and rewrites an unfinished one identically. ``idi_report.json`` and the log
give the pass rate (the paper keeps about 100k of 120k, 83 %).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .annotate import LatentAnnotator, LocalImageAnnotator, Sample
from .config import Config, load_config
from .data import ShardDataset
from .demo_data import ensure_demo_data
from .metrics import exp_mean, idi_keep, lms_score
from .models import load_host_models
from .pair_samplers import same_person_other_expression, sample_table
from .prepare import Options, encode_sample, finish
from .shards import ShardWriter, load_index, shard_name, sidecar_path, write_json_atomic
from .stages.emojidiff import (
    PromptEncoder,
    e_adapter_conditions,
    frozen,
    initial_adapter,
    merge_lora,
    named_branches,
)

logger = logging.getLogger("training.idi")
FIELDS = ("faceid", "clip_image", "landmarks", "blendshapes")
PAPER_PASS_RATE = 100 / 120  # [P §4 Dataset]: about 120k triplets, about 100k kept
REPORT = "idi_report.json"


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """3 x H x W in -1..1 -> H x W x 3 uint8."""
    return ((pixels.float().permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


class IDI:
    """The models and data of one IDI run (see the module docstring); :meth:`row` processes one real image."""

    def __init__(self, config: Config, swapper, landmarker, clip_vision=None, device=None):
        from adapters.layers import SD15
        from hosts.diffusers import attach_adapters

        self.config, self.idi, self.cfg = config, config["idi"], config["emojidiff"]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(self.idi["out"])
        self.swapper, self.landmarker, self.clip_vision = swapper, landmarker, clip_vision
        self.records = load_index(config["data"]["shards"])
        first = self.records[0]["samples"][0]["members"]
        self.frames = ShardDataset(self.records, FIELDS, resolution=None, load_image=True,
                                   load_latents="latent_mean.npy" in first)
        table = sample_table(self.frames, expression="blendshapes", pose=None)
        self.persons = table.person
        self.sources = same_person_other_expression(table, float(self.cfg["expression_threshold"]))
        self.host = load_host_models(config, self.device, torch.float32, need_vae=True)
        from .models import unet_layout

        if unet_layout(self.host.unet) is not SD15:
            raise ValueError("IDI renders with the base E-Adapter, which EmojiDiff trains on SD1.5; give an SD1.5 UNet")
        self.adapter = frozen(initial_adapter(dict(self.cfg) | {"init": self.idi["adapter"]}, self.host.unet, self.out),
                              self.device)
        if float(self.cfg["faceid_lora_scale"]) and self.adapter.lora:
            merge_lora(self.host.unet, self.adapter.lora, float(self.cfg["faceid_lora_scale"]))
        attach_adapters(self.host.unet, named_branches(self.adapter))
        self.prompts = PromptEncoder.from_config(config["model"], self.out, self.device, torch.float32)
        self.options = Options(out=str(self.out), insightface="", smirk="", image_format="png")

    @torch.no_grad()
    def render(self, faceid: torch.Tensor, clip_image: torch.Tensor, size: int, row: int) -> np.ndarray:
        """Y0: the base E-Adapter's picture with this identity and expression, ``size`` pixels square."""
        from adapters.rows import COND, UNCOND

        from .sampling import SamplingInputs, denoise, to_pixels

        host = self.host
        conditions = e_adapter_conditions(self.adapter, faceid[None].to(self.device), clip_image[None].to(self.device))
        context, _ = self.prompts([self.cfg["prompt"]])
        negative, _ = self.prompts([""])
        generator = torch.Generator(self.device).manual_seed(int(self.idi["seed"]) * 1_000_003 + row)
        shape = (1, host.unet.config.in_channels, size // 8, size // 8)
        latents = denoise(host.unet, host.noise_scheduler.config, SamplingInputs({UNCOND: negative, COND: context}, conditions),
                          shape, int(self.idi["steps"]), float(self.idi["guidance_scale"]), generator)
        image = to_pixels(latents, host.vae, host.latent_scale, host.latent_shift)[0]
        return (image.permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)

    def row(self, index: int) -> tuple[dict | None, dict]:
        """(the files of the kept triplet or None, what happened: reason, Exp mean, LMS)."""
        rng = np.random.default_rng([int(self.idi["seed"]), index])
        person = self.persons[index]
        others = np.flatnonzero(self.persons != person)
        if not len(others):
            return None, {"reason": "no_other_person"}
        real = self.frames[index]
        portrait_index = int(others[rng.integers(len(others))])
        portrait = self.frames[portrait_index]
        role = self.idi["synthetic_role"]
        source_index = None
        if role == "reference":
            candidates = self.sources[index]
            if not len(candidates):
                return None, {"reason": "no_other_image_of_person"}
            source_index = int(candidates[rng.integers(len(candidates))])
        x = to_uint8(real["pixels"])
        y0 = self.render(portrait["faceid"], real["clip_image"], x.shape[0], index)
        y = np.ascontiguousarray(self.swapper.swap(to_uint8(portrait["pixels"]), y0))
        if y.shape != x.shape:
            raise ValueError(f"the swapper returned a {y.shape} picture for a {x.shape} target")
        try:
            found = self.landmarker.detect(y[None], running_mode="image")
        except ValueError:
            return None, {"reason": "no_face"}
        y_landmarks, y_blendshapes = found.landmarks.values[0].numpy(), found.blendshapes.values[0].numpy()
        x_landmarks, x_blendshapes = real["landmarks"].numpy(), real["blendshapes"].numpy()
        exp = float(exp_mean(x_blendshapes[None], y_blendshapes[None])[0])
        lms = float(lms_score(x_landmarks[None], y_landmarks[None])[0])
        outcome = {"exp_mean": exp, "lms": lms, "portrait": portrait["key"]}
        if not idi_keep(exp, lms, float(self.idi["max_exp_mean"]), float(self.idi["max_lms"])):
            return None, outcome | {"reason": "idi_filter"}
        meta = {"idi": {"synthetic_role": role, "real": real["key"], "portrait": portrait["key"], "exp_mean": exp, "lms": lms},
                "person_id": str(person), "synthetic_person": str(self.persons[portrait_index])}
        if role == "reference":
            source = self.frames[source_index]
            meta["idi"]["source"] = source["key"]
            sample = Sample(x, meta, crop=x, arrays={"landmarks": x_landmarks, "blendshapes": x_blendshapes,
                                                     "faceid": source["faceid"].numpy()})
            for name in ("latent_mean", "latent_std"):
                if name in real:
                    sample.arrays[name] = real[name].numpy().astype(np.float16)
            synthetic = Sample(y, {}, crop=y, arrays={"landmarks": y_landmarks})
            LocalImageAnnotator(self.clip_vision)(synthetic)
            sample.arrays["clip_image"] = synthetic.arrays["clip_image"]
            sample.files.update({"local.jpg": synthetic.files["local.jpg"], "reference.png": y})
        else:
            meta["person_id"], meta["idi"]["source"] = str(self.persons[portrait_index]), portrait["key"]
            sample = Sample(y, meta, crop=y, arrays={"landmarks": y_landmarks, "blendshapes": y_blendshapes,
                                                     "faceid": portrait["faceid"].numpy(), "clip_image": real["clip_image"].numpy()})
            LatentAnnotator(self.host.vae, self.device)(sample)
        return encode_sample(sample, self.options), outcome | {"person_id": meta["person_id"]}

    def run(self, process_index: int = 0, num_processes: int = 1, max_shards: int | None = None) -> dict:
        per_shard = int(self.idi["items_per_shard"])
        num_shards = math.ceil(len(self.frames) / per_shard)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"settings": {"idi": dict(self.idi), "source": str(self.config["data"]["shards"])},
                           "shards": [list(range(k * per_shard, min(len(self.frames), (k + 1) * per_shard)))
                                      for k in range(num_shards)]}, self.out / "plan.json")
        vae = next((record.get("vae") for record in self.records if record.get("vae")), None)
        written = 0
        for k in range(num_shards):
            if k % num_processes != process_index or sidecar_path(self.out / shard_name(k)).is_file():
                continue
            if max_shards is not None and written >= max_shards:
                break
            writer = ShardWriter(self.out / shard_name(k))
            skipped = []
            rows = range(k * per_shard, min(len(self.frames), (k + 1) * per_shard))
            for index in rows:
                files, outcome = self.row(index)
                if files is None:
                    skipped.append({"source": self.frames.info(index)["key"], "frame_index": None} | outcome)
                    continue
                writer.add(f"idi-{index:08d}", files, {"person_id": outcome["person_id"]})
            fields = sorted({field for s in writer.samples for field in s["members"]})
            writer.close({"items": len(rows), "skipped": skipped, "fields": fields, "vae": vae,
                          "notes": [f"IDI triplets (synthetic image as {self.idi['synthetic_role']})"]})
            written += 1
            logger.info("IDI shard %d: kept %d of %d", k, len(rows) - len(skipped), len(rows))
        return report(self.out, num_shards)


def report(out: Path, num_shards: int) -> dict:
    """prepare's report.json (and manifest.json once every shard is done), and the pass rate in idi_report.json."""
    summary = finish(out, num_shards)
    attempted = summary["items"]
    kept = summary["samples"]
    result = {"attempted": attempted, "kept": kept, "pass_rate": kept / attempted if attempted else None,
              "paper_pass_rate": PAPER_PASS_RATE, "dropped": summary["skipped"],
              "shards_done": summary["shards_done"], "shards_total": num_shards}
    write_json_atomic(result, out / REPORT)
    if attempted:
        logger.info("IDI pass rate %.1f %% (%d of %d; the paper keeps about 83 %%)", 100 * kept / attempted, kept, attempted)
    return result


def build_swapper(idi: Mapping):
    from encoders.identity import FaceAnalyzer

    from .face_swap import InsightfaceSwapper

    if idi["swapper"] != "inswapper":
        raise ValueError(f"idi.swapper {idi['swapper']!r}: the command line offers inswapper; other swappers are objects "
                         "with swap(source, target) given to training.idi.IDI")
    if not idi["swapper_model"] or not idi["insightface"]:
        raise ValueError("the inswapper swapper needs idi.swapper_model (inswapper_128.onnx) and idi.insightface "
                         "(a buffalo_l folder: detector and w600k_r50.onnx)")
    return InsightfaceSwapper(idi["swapper_model"], FaceAnalyzer.from_folder(idi["insightface"], recognizer="w600k_r50.onnx"))


def load_clip_vision(idi: Mapping):
    if idi["clip_vision"]:
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection.from_pretrained(idi["clip_vision"], local_files_only=True)
    if idi["tiny_clip_vision"] is not None:
        from .tiny import tiny_clip_vision

        return tiny_clip_vision(idi["tiny_clip_vision"])
    if idi["synthetic_role"] == "reference":
        raise ValueError("idi.synthetic_role reference embeds the synthetic image's local image: set idi.clip_vision "
                         "(the CLIP vision model prepare used, e.g. IP-Adapter's ViT-H/14 image_encoder folder)")
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.idi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file such as training/configs/emojidiff_idi.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--num-processes", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--process-index", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--max-shards", type=int, default=None, help="stop after this many shards (resume later)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from encoders.face_landmarks import FaceLandmarker

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides)
    idi = config["idi"]
    if not idi["adapter"]:
        raise ValueError("set idi.adapter: the base E-Adapter file emojidiff_base exported")
    if not idi["landmarker"]:
        raise ValueError("set idi.landmarker: MediaPipe's face_landmarker.task (the filter's Exp and LMS)")
    if args.process_index == 0:
        ensure_demo_data(config)
    with FaceLandmarker(idi["landmarker"], max_faces=1) as landmarker:
        result = IDI(config, build_swapper(idi), landmarker, load_clip_vision(idi)).run(
            args.process_index, args.num_processes, args.max_shards)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
