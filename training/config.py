"""Training configuration: a YAML file over built-in defaults, with ``--set a.b=value`` overrides.

Every key the trainer reads has a default here, so a config file names only what it changes;
an unknown key is an error (a typo would otherwise be silently ignored for 300K iterations).
Paths in a config are resolved relative to the current directory (runs start from the
repository root), and a path that does not exist is reported before any model is loaded.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .emojidiff_config import EMOJIDIFF_DEFAULTS, EMOJIDIFF_PATH_KEYS, IDI_DEFAULTS, validate_emojidiff
from .facecrafter_config import (
    FACECRAFTER_DEFAULTS,
    FACECRAFTER_FREE_BLOCKS,
    FACECRAFTER_PATH_KEYS,
    check_facecrafter,
)

DEFAULTS: dict[str, Any] = {
    "stage": "expression_adapter",
    "output_dir": "runs/expression_adapter",
    "seed": 0,
    "model": {
        # A diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) such as
        # Arc2Face's arc2face/; or null with `tiny_unet` set (smoke runs and tests).
        "unet": None,
        "tiny_unet": None,
        # An AutoencoderKL folder (sd-vae-ft-mse); needed unless every sample has cached latents.
        "vae": None,
        "tiny_vae": None,
        # scheduler_config.json of the base model; null means SD1.5's DDPM schedule.
        "scheduler": None,
        # Arc2Face's encoder/ folder and an SD1.5 CLIP tokenizer folder; or `tiny_id_encoder`.
        "id_encoder": None,
        "tokenizer": None,
        "tiny_id_encoder": None,
        # EmojiDiff stages: the base model's text encoder(s) (CLIPTextModel folders; SDXL adds its second,
        # CLIPTextModelWithProjection, and tokenizer), or `tiny_text_encoder` (smoke runs and tests).
        "text_encoder": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "tiny_text_encoder": None,
    },
    "adapter": {
        "projection": "mlp",  # "mlp" (published: Linear-GELU-Linear + LayerNorm) or "linear"
        "hidden_dim": None,  # MLP hidden width; null: 2 x 55, as the published file
        "num_tokens": 4,
        "init": None,  # an exp_adapter.bin/.safetensors to start from
        "init_kv_from_unet": True,  # IP-Adapter's initialisation: to_k_ip/to_v_ip = the layer's to_k/to_v
        "seed": 0,
    },
    "reference_lora": {
        "rank": 128,
        "alpha": None,  # null: alpha = rank (scale 1), as the published file implies
        "expression_adapter": None,  # the trained Expression Adapter (frozen in this stage)
        "pair_window_seconds": 2.0,
    },
    # EmojiDiff's E-Adapter stages (training/stages/emojidiff.py; spec A2).
    "emojidiff": EMOJIDIFF_DEFAULTS,
    "idi": IDI_DEFAULTS,
    "facecrafter": FACECRAFTER_DEFAULTS,
    "data": {
        "shards": None,  # a manifest.json written by training.prepare, a shard folder, or a glob of .tar
        "resolution": 512,
        "use_cached_latents": True,  # use latents stored by prepare; else VAE-encode each step
        "shuffle_shards": 4,  # shards whose samples are mixed together
        "num_workers": 2,
        # Smoke configs: when data.shards does not exist, build the small demo set of
        # training/demo_data.py there (pictures shipped in packages, stand-in models) and train on it.
        "demo_if_missing": False,
    },
    "train": {
        "batch_size": 8,  # per process (per GPU)
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-4,
        "weight_decay": 0.01,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1.0e-8,
        "lr_scheduler": "constant",  # constant | linear | cosine (after warmup)
        "lr_warmup_steps": 0,
        "max_steps": 300000,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",  # no | fp16 | bf16
        "gradient_checkpointing": False,
        "attention": "sdpa",  # sdpa (PyTorch picks the kernel) | math | flash | efficient
        "allow_tf32": True,
        # CPU threads for torch (null: torch's default). Tiny models are bound by per-op
        # overhead, where one thread is often faster than two fighting over a busy machine.
        "cpu_threads": None,
        # Condition dropout so classifier-free guidance works (IP-Adapter's 0.05 each).
        "drop_expression": 0.05,
        "drop_id": 0.05,
        "drop_both": 0.05,
        "noise_offset": 0.0,
    },
    "checkpointing": {
        "every_steps": 5000,
        "keep_last": 3,
        "resume": "latest",  # latest | none | a checkpoint folder
    },
    "logging": {
        "every_steps": 10,
        "tensorboard": True,
        "progress_bar": True,
    },
    "sampling": {
        "every_steps": 5000,  # 0 turns sample grids off
        "num_inference_steps": 25,
        "guidance_scale": 3.0,
        "num_samples": 4,
        "seed": 1234,
    },
    "export": {
        "file": "expression_adapter.safetensors",
        "id_encoder_folder": "id_encoder",  # facecrafter_joint: the trained ID encoder, for Load Arc2Face ID Encoder
    },
}

# Keys whose values are free-form blocks (model constructor arguments), not checked key by key.
FREE_BLOCKS = {("model", "tiny_unet"), ("model", "tiny_vae"), ("model", "tiny_id_encoder"), ("model", "tiny_text_encoder"),
               ("emojidiff", "standin_published"), ("emojidiff", "tiny_arcface"), ("emojidiff", "tiny_fan"),
               ("idi", "tiny_clip_vision"), *FACECRAFTER_FREE_BLOCKS}
PATH_KEYS = [("model", "unet"), ("model", "vae"), ("model", "scheduler"), ("model", "id_encoder"),
             ("model", "tokenizer"), ("adapter", "init"), ("reference_lora", "expression_adapter"),
             *EMOJIDIFF_PATH_KEYS, *FACECRAFTER_PATH_KEYS]


class ConfigError(ValueError):
    """A config that names a missing file, an unknown key or an impossible value."""


class Config(dict):
    """A nested dict with attribute access (``config.train.batch_size``)."""

    def __getattr__(self, name: str):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(value) if isinstance(value, Mapping) and not isinstance(value, Config) else value


def _merge(base: dict, update: Mapping, where: tuple[str, ...] = ()) -> dict:
    for key, value in update.items():
        path = (*where, key)
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key {'.'.join(path)!r} (known at this level: {known})")
        if isinstance(base[key], dict) and path not in FREE_BLOCKS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {'.'.join(path)!r} must be a mapping; got {value!r}")
            _merge(base[key], value, path)
        else:
            base[key] = copy.deepcopy(dict(value)) if isinstance(value, Mapping) else value
    return base


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` with the value read as YAML (numbers, booleans, null, lists)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path=None, overrides: list[str] | None = None, check_paths: bool = True) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides``; validated."""
    import yaml

    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
        _merge(config, loaded)
    for text in overrides or []:
        keys, value = parse_override(text)
        update: Any = value
        for key in reversed(keys):
            update = {key: update}
        _merge(config, update)
    config = Config(config)
    validate(config, check_paths)
    return config


def validate(config: Mapping, check_paths: bool = True) -> None:
    model, train, data = config["model"], config["train"], config["data"]
    if train["mixed_precision"] is False:  # YAML 1.1 reads an unquoted `no` as false
        train["mixed_precision"] = "no"
    from .stages import STAGES

    if config["stage"] not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}; got {config['stage']!r}")
    if (model["unet"] is None) == (model["tiny_unet"] is None):
        raise ConfigError("set exactly one of model.unet (a diffusers UNet folder) and model.tiny_unet (a random tiny UNet)")
    if config["stage"].startswith("emojidiff"):
        validate_emojidiff(config, ConfigError)
    elif model["id_encoder"] is None and model["tiny_id_encoder"] is None:
        raise ConfigError("set model.id_encoder (Arc2Face's encoder/ folder) with model.tokenizer, or model.tiny_id_encoder")
    if model["id_encoder"] is not None and model["tokenizer"] is None:
        raise ConfigError("model.id_encoder needs model.tokenizer: an SD1.5 CLIP tokenizer folder (vocab.json, merges.txt)")
    if data["shards"] is None:
        raise ConfigError("data.shards is not set: give the manifest.json written by `python -m training.prepare`")
    if train["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision must be no, fp16 or bf16; got {train['mixed_precision']!r}")
    if train["attention"] not in ("sdpa", "math", "flash", "efficient"):
        raise ConfigError(f"train.attention must be sdpa, math, flash or efficient; got {train['attention']!r}")
    if train["lr_scheduler"] not in ("constant", "linear", "cosine"):
        raise ConfigError(f"train.lr_scheduler must be constant, linear or cosine; got {train['lr_scheduler']!r}")
    for name in ("drop_expression", "drop_id", "drop_both"):
        if not 0.0 <= float(train[name]) <= 1.0:
            raise ConfigError(f"train.{name} is a probability; got {train[name]}")
    if float(train["drop_expression"]) + float(train["drop_id"]) + float(train["drop_both"]) > 1.0:
        raise ConfigError("train.drop_expression + drop_id + drop_both must not exceed 1")
    for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
        if int(train[name]) < 1:
            raise ConfigError(f"train.{name} must be at least 1; got {train[name]}")
    if config["stage"] == "reference_lora" and not config["reference_lora"]["expression_adapter"]:
        raise ConfigError("stage reference_lora trains with the Expression Adapter frozen: set reference_lora.expression_adapter "
                          "to the file stage 1 exported")
    check_facecrafter(config, ConfigError)
    if config["adapter"]["projection"] not in ("mlp", "linear"):
        raise ConfigError(f"adapter.projection must be mlp or linear; got {config['adapter']['projection']!r}")
    if not check_paths:
        return
    for section, key in PATH_KEYS:
        value = config[section][key]
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{section}.{key} names {value}, which does not exist")
    shards = str(data["shards"])
    if not any(ch in shards for ch in "*?[") and not Path(shards).exists() and not data["demo_if_missing"]:
        raise ConfigError(f"data.shards names {shards}, which does not exist; run `python -m training.prepare` first")
    resume = config["checkpointing"]["resume"]
    if resume not in (None, "latest", "none") and not Path(resume).is_dir():
        raise ConfigError(f"checkpointing.resume names {resume}, which is not a checkpoint folder")


def dump_config(config: Mapping, path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(_plain(config), sort_keys=False), encoding="utf-8")


def _plain(value):
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value
