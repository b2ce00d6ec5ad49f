"""FaceCrafter control modules (Mishima et al., BMVC 2025): landmark (LMK) and emotion (EMO) branches on Arc2Face.

Paper Eq. 1, per cross-attention layer::

    Attention_final = Attn_ID + alpha_LMK * Attn_LMK + alpha_EMO * Attn_EMO

Attn_ID is the layer's own cross-attention over Arc2Face's ID tokens. Each module turns its
condition into tokens and has its own bias-free key/value projections per layer
(:class:`adapters.attention.KeyValueBranch`); the alphas are per row, so one batch mixes switch
settings (the paper's intra-batch mixed conditioning, and the four-prediction guidance).

The paper's supplementary (module architectures) is not available. Everything below marked
CHOICE is ours, fitted to the paper's parameter counts (LMK 11.7M, LMK+EMO 18M: 256-d tokens
on all 16 SD1.5 cross-attention layers = 24,960 x 256 K/V weights per module, plus the module),
and configurable through :class:`LandmarkEncoderConfig` / :class:`EmotionEncoderConfig`:

- LMK (CHOICE): landmark image 3 x 512 x 512 (values 0..1 as ``encoders.landmark_image`` renders
  it) -> 3x3 conv + SiLU 3->32 (stride 1), then 32, 64, 128, 256, 256 channels at stride 2 (16 x 16)
  -> conv 256->256 -> 3 residual blocks (GroupNorm-SiLU-conv x 2) -> GroupNorm -> 1x1 conv ->
  256 tokens x 256-d + learned position embedding -> LayerNorm.
- EMO (CHOICE): 10-d emotion (valence, arousal, 8 class probabilities) -> Linear-SiLU-Linear-SiLU-
  Linear -> 4 tokens x 256-d -> LayerNorm.
- K/V (CHOICE): K keeps PyTorch's default init; V starts at zero, so an untrained branch is a no-op.

File: one safetensors, sections ``lmk.*`` and ``emo.*`` (either may be absent), metadata with the
configurations, the layer set and the landmark-image style the LMK module was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .attention import KeyValueBranch
from .checkpoints import (
    AdapterFileError,
    load_strict,
    read_checkpoint,
    read_safetensors_metadata,
    split_prefix,
    without_init,
    write_safetensors,
)
from .layers import SD15, AttentionLayer, UNetLayout, select_layers
from .rows import RowLayout

EMOTION_DIM = 10
KIND = "FaceCrafter control modules"
BASE_MODEL = "Arc2Face (SD1.5)"
MODULE_NAMES = ("lmk", "emo")
# The landmark image the LMK module reads: encoders.landmark_image.render_landmark_image's arguments.
DEFAULT_LANDMARK_STYLE = {"palette": "regions", "thickness": 2, "fit": "image", "size": 512, "values": "0..1 RGB"}


def sd15_width(layer: AttentionLayer) -> int:
    """The query width of an SD1.5 cross-attention layer (320 / 640 / 1280)."""
    block, index = layer.diffusers_name.split(".")[:2]
    levels = (320, 640, 1280, 1280)
    if block == "mid_block":
        return 1280
    return levels[int(index)] if block == "down_blocks" else levels[3 - int(index)]


@dataclass(frozen=True)
class LandmarkEncoderConfig:
    image_size: int = 512
    channels: tuple[int, ...] = (32, 32, 64, 128, 256, 256)  # first at stride 1, the rest at stride 2
    token_dim: int = 256
    res_blocks: int = 3
    groups: int = 32

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (len(self.channels) - 1)

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclass(frozen=True)
class EmotionEncoderConfig:
    hidden_dim: int = 256
    token_dim: int = 256
    num_tokens: int = 4


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class LandmarkEncoder(nn.Module):
    """Landmark image (B x 3 x S x S, 0..1) -> (B, (S/32)^2, token_dim) tokens."""

    def __init__(self, config: LandmarkEncoderConfig = LandmarkEncoderConfig()):
        super().__init__()
        self.config = config
        layers, previous = [], 3
        for i, channels in enumerate(config.channels):
            layers += [nn.Conv2d(previous, channels, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU()]
            previous = channels
        layers.append(nn.Conv2d(previous, config.token_dim, 3, padding=1))
        layers += [_ResidualBlock(config.token_dim, config.groups) for _ in range(config.res_blocks)]
        layers += [nn.GroupNorm(config.groups, config.token_dim), nn.Conv2d(config.token_dim, config.token_dim, 1)]
        self.cnn = nn.Sequential(*layers)
        self.position = nn.Parameter(torch.randn(config.num_tokens, config.token_dim) * 0.02)
        self.norm = nn.LayerNorm(config.token_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"landmark images must have shape (batch, 3, {size}, {size}); got {tuple(images.shape)}")
        features = self.cnn(images)
        return self.norm(features.flatten(2).transpose(1, 2) + self.position)


class EmotionEncoder(nn.Module):
    """Emotion (B x 10) -> (B, num_tokens, token_dim) tokens."""

    def __init__(self, config: EmotionEncoderConfig = EmotionEncoderConfig()):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(EMOTION_DIM, config.hidden_dim), nn.SiLU(), nn.Linear(config.hidden_dim, config.hidden_dim),
                                 nn.SiLU(), nn.Linear(config.hidden_dim, config.num_tokens * config.token_dim))
        self.norm = nn.LayerNorm(config.token_dim)

    def forward(self, emotion: torch.Tensor) -> torch.Tensor:
        check_emotion(emotion)
        out = self.mlp(emotion).reshape(-1, self.config.num_tokens, self.config.token_dim)
        return self.norm(out)


def check_emotion(emotion: torch.Tensor) -> None:
    if not isinstance(emotion, torch.Tensor) or emotion.dim() != 2 or emotion.shape[1] != EMOTION_DIM:
        shape = tuple(emotion.shape) if isinstance(emotion, torch.Tensor) else type(emotion).__name__
        raise ValueError(f"an emotion must have shape (batch, {EMOTION_DIM}): valence, arousal and 8 class probabilities; got {shape}")
    bad = (~torch.isfinite(emotion)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"emotion rows {', '.join(str(i + 1) for i in bad)} have NaN or infinite values")


class ControlModule(nn.Module):
    """One FaceCrafter control module: an encoder to tokens plus its own K/V on each layer it covers.

    Offers ``layers``, ``layout``, ``branch(layer)`` and ``kind`` like
    :class:`adapters.cross_attention_adapter.CrossAttentionAdapter`, so both attention hosts take it.
    """

    def __init__(self, name: str, encoder: nn.Module, layers: tuple[AttentionLayer, ...], widths: Mapping[int, int]):
        super().__init__()
        self.name = name
        self.kind = f"FaceCrafter {name.upper()} module"
        self.layout: UNetLayout = SD15
        self.encoder = encoder
        token_dim = encoder.config.token_dim
        self.kv = nn.ModuleDict({str(layer.checkpoint_number): KeyValueBranch(token_dim, widths[layer.checkpoint_number])
                                 for layer in layers})
        self.layers = layers
        with torch.no_grad():
            for branch in self.kv.values():
                branch.to_v_ip.weight.zero_()  # CHOICE: an untrained branch adds nothing

    @property
    def token_dim(self) -> int:
        return self.encoder.config.token_dim

    def branch(self, layer: AttentionLayer) -> KeyValueBranch:
        return self.kv[str(layer.checkpoint_number)]

    def tokens(self, condition: torch.Tensor) -> torch.Tensor:
        parameter = next(self.encoder.parameters())
        return self.encoder(condition.to(device=parameter.device, dtype=parameter.dtype))

    def key_value_parameters(self) -> int:
        return sum(p.numel() for p in self.kv.parameters())

    def encoder_parameters(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())


class FaceCrafter(nn.Module):
    """The LMK and/or EMO control modules for Arc2Face (SD1.5). Either may be absent (``None``)."""

    kind = KIND
    base_model = BASE_MODEL

    def __init__(self, lmk: LandmarkEncoderConfig | None = LandmarkEncoderConfig(),
                 emo: EmotionEncoderConfig | None = EmotionEncoderConfig(), layer_set: str = "all",
                 widths: Mapping[int, int] | None = None, layout: UNetLayout = SD15,
                 landmark_style: Mapping | None = None):
        super().__init__()
        if layout is not SD15:
            raise ValueError(f"FaceCrafter is built on Arc2Face, an SD1.5 model; it has no {layout.name} form")
        if lmk is None and emo is None:
            raise ValueError("FaceCrafter needs at least one control module (LMK or EMO)")
        self.layer_set = layer_set
        self.layout = layout
        layers = select_layers(layout, layer_set)
        widths = dict(widths) if widths is not None else {layer.checkpoint_number: sd15_width(layer) for layer in layers}
        self.landmark_style = dict(landmark_style or DEFAULT_LANDMARK_STYLE)
        self.lmk = ControlModule("lmk", LandmarkEncoder(lmk), layers, widths) if lmk is not None else None
        self.emo = ControlModule("emo", EmotionEncoder(emo), layers, widths) if emo is not None else None

    def modules_present(self) -> dict[str, ControlModule]:
        return {name: module for name in MODULE_NAMES if (module := getattr(self, name)) is not None}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per module (its K/V included) and in total."""
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in self.modules_present().items()}
        return counts | {"total": sum(counts.values())}

    def landmark_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) landmark images (0..1) -> LMK tokens."""
        if self.lmk is None:
            raise ValueError("this FaceCrafter file has no LMK (landmark) module; leave the landmark image unconnected")
        return self.lmk.tokens(images)

    def emotion_tokens(self, emotion: torch.Tensor) -> torch.Tensor:
        """(B, 10) emotions -> EMO tokens."""
        if self.emo is None:
            raise ValueError("this FaceCrafter file has no EMO (emotion) module; leave the emotion unconnected")
        check_emotion(emotion)
        return self.emo.tokens(emotion)

    # -- files -------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        meta = {"kind": self.kind, "layout": self.layout.name, "layer_set": self.layer_set,
                "landmark_style": json.dumps(self.landmark_style)}
        if self.lmk is not None:
            meta["lmk_config"] = json.dumps(asdict(self.lmk.encoder.config))
        if self.emo is not None:
            meta["emo_config"] = json.dumps(asdict(self.emo.encoder.config))
        return meta

    def save(self, path) -> None:
        write_safetensors(self.state_dict(), path, metadata=self.metadata())

    @classmethod
    def from_file(cls, path) -> FaceCrafter:
        path = str(path)
        if not path.lower().endswith((".safetensors", ".sft")):
            raise AdapterFileError(path, KIND, BASE_MODEL, "FaceCrafter files are .safetensors (with metadata)")
        metadata = read_safetensors_metadata(path)
        return cls.from_state_dict(read_checkpoint(path), metadata, path)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path="<state dict>") -> FaceCrafter:
        sections = {name: split_prefix(state_dict, name) for name in MODULE_NAMES}
        others = sorted({key.split(".")[0] for key in state_dict} - set(MODULE_NAMES))
        if others or not any(sections.values()):
            raise AdapterFileError(path, KIND, BASE_MODEL, f"expected 'lmk' and/or 'emo' sections, found {others or 'none'}")
        try:
            configs = {"lmk": _config(LandmarkEncoderConfig, metadata.get("lmk_config")) if sections["lmk"] else None,
                       "emo": _config(EmotionEncoderConfig, metadata.get("emo_config")) if sections["emo"] else None}
        except (TypeError, ValueError) as error:
            raise AdapterFileError(path, KIND, BASE_MODEL, f"unreadable module configuration in the metadata: {error}") from None
        if metadata.get("layout", SD15.name) != SD15.name:
            raise AdapterFileError(path, KIND, BASE_MODEL, f"made for {metadata['layout']}; FaceCrafter is Arc2Face (SD1.5) only")
        layer_set = metadata.get("layer_set", "all")
        widths = _widths_in(sections)
        style = json.loads(metadata["landmark_style"]) if "landmark_style" in metadata else None

        def build():
            try:
                return cls(configs["lmk"], configs["emo"], layer_set=layer_set, widths=widths or None, landmark_style=style)
            except (KeyError, ValueError) as error:
                raise AdapterFileError(path, KIND, BASE_MODEL,
                                       f"its K/V layers do not fit the layer set {layer_set!r}: {error}") from None

        # the metadata sizes the modules: built without weights, they are checked against the tensors before
        # anything is allocated, so made-up metadata is refused; then they take the file's tensors
        with without_init():
            crafter = build()
        for name, module in crafter.modules_present().items():
            load_strict(module, sections[name], path, f"{KIND} ({name} section)", BASE_MODEL)
        return crafter.eval()


def _config(config_class, text: str | None):
    if text is None:
        return config_class()
    values = json.loads(text)
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    return config_class(**values)


def _widths_in(sections: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[int, int]:
    widths = {}
    for section in sections.values():
        for key, tensor in section.items():
            parts = key.split(".")  # kv.<layer number>.to_k_ip.weight
            if len(parts) == 4 and parts[0] == "kv" and parts[1].isdigit() and parts[2:] == ["to_k_ip", "weight"]:
                widths[int(parts[1])] = tensor.shape[0]
    return widths


# -- per-row switches -----------------------------------------------------------------------------

# FaceCrafter Guider's four predictions, as (alpha_LMK, alpha_EMO) per conditioning list index
# (paper Eq. 6): uncond, ID, ID+LMK, ID+EMO.
GUIDANCE_SWITCHES = {0: (0.0, 0.0), 1: (0.0, 0.0), 2: (1.0, 0.0), 3: (0.0, 1.0)}
# Which of those predictions are conditional, for the other adapters on the model (rows.CONDITIONAL_KEY):
# all but the negative.
GUIDANCE_CONDITIONAL = {0: False, 1: True, 2: True, 3: True}
# transformer_options entry: {conditioning index: (alpha_LMK, alpha_EMO)}, set by the FaceCrafter Guider
SWITCHES_KEY = "facecrafter_switches"
# A plain sampler: conditional rows (index 0) get both branches, unconditional rows (index 1) none.
CFG_SWITCHES = {0: (1.0, 1.0), 1: (0.0, 0.0)}


def multi_condition_guidance(unconditional: torch.Tensor, with_id: torch.Tensor, with_modules, w_id: float,
                             w_modules) -> torch.Tensor:
    """Paper Eq. 6: eps_uncond + w_ID (eps_ID - eps_uncond) + sum over modules m of w_m (eps_ID+m - eps_ID).

    ``with_modules`` and ``w_modules`` pair each module's prediction (ID+LMK, ID+EMO) with its weight; the
    FaceCrafter Guider and training's previews both guide with it."""
    guided = unconditional + w_id * (with_id - unconditional)
    for prediction, weight in zip(with_modules, w_modules, strict=True):
        guided = guided + weight * (prediction - with_id)
    return guided


def row_alphas(layout: RowLayout, switches: Mapping[int, tuple[float, float]], module: int,
               strength: float = 1.0) -> list[float]:
    """One alpha per row of ``layout``: its chunk's switch for ``module`` (0 LMK, 1 EMO) times ``strength``.

    An index absent from ``switches`` has the branch off.
    """
    return layout.scales(lambda index: float(switches.get(index, (0.0, 0.0))[module]) * strength).tolist()


class SwitchedCondition:
    """One module (LMK or EMO) as a branch condition (``adapters.branches``): its tokens, one row for the batch
    or one per image (the context window's frames), in every chunk; each row scaled by its chunk's switch
    times ``strength``. The switches are a guider's (``options[SWITCHES_KEY]``), else :data:`CFG_SWITCHES`."""

    def __init__(self, module: ControlModule, tokens: torch.Tensor, strength: float, index: int, what: str):
        self.adapter = module
        self.tokens = tokens
        self.strength = float(strength)
        self.index = index  # 0 LMK, 1 EMO: the place of its alpha in a switch
        self.what = what

    def keys_values(self, layer: AttentionLayer, layout: RowLayout, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens if self.tokens.shape[0] == 1 else layout.per_image(self.tokens, self.what)
        key, value = self.adapter.branch(layer).keys_values(tokens.to(device, dtype))
        repeats = 1 if tokens.shape[0] == 1 else len(layout.chunks)  # one shared row stays one row
        return key.repeat(repeats, 1, 1), value.repeat(repeats, 1, 1)

    def scales(self, layout: RowLayout, options: Mapping | None = None) -> list[float]:
        return row_alphas(layout, (options or {}).get(SWITCHES_KEY, CFG_SWITCHES), self.index, self.strength)
