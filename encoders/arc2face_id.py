"""Arc2Face's ID encoder: ArcFace embeddings -> 77 x D text-encoder conditioning.

The published encoder (hub FoivosPar/Arc2Face, folder ``encoder/``) is a fine-tuned
``CLIPTextModel``: ``config.json`` plus ``pytorch_model.bin`` (or ``model.safetensors``). The
prompt "photo of a id person" is tokenised with the SD1.5 CLIP tokenizer and padded to 77 tokens;
the token embedding at ``id`` is replaced by the ArcFace vector (L2-normalised, zero-padded from
its width E to the encoder width D; E > D is an error); the output is the last hidden state
after the final layer norm. Attention is causal, so only positions from ``id`` on depend on the
identity. The negative conditioning is the same encoder on the empty prompt, unless the folder holds
``negative_conditioning.safetensors`` (FaceCrafter's joint stage writes the original encoder's
negative there, beside the encoder it fine-tuned).

transformers 4 saved the model with keys ``text_model.embeddings.*``; transformers 5's
``CLIPTextModel`` has no ``text_model`` level. Either layout loads under either version.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .checks import rows_text
from .optional import require
from .weight_files import read_checkpoint

ID_PROMPT = "photo of a id person"
ID_WORD = "id"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
LEGACY_PREFIX = "text_model."
# "clip" is a full CLIP config; CLIPTextConfig reads its text_config.
CONFIG_MODEL_TYPES = ("clip_text_model", "clip")
# Optional, beside a fine-tuned encoder's weights: the negative conditioning to use instead of the encoder on "".
NEGATIVE_FILE = "negative_conditioning.safetensors"
ENCODER_SOURCE = "the encoder/ folder of hub repo FoivosPar/Arc2Face (encoder/config.json, encoder/pytorch_model.bin)"


class EncoderFilesError(ValueError):
    """An encoder or tokenizer folder that is missing files or holds another architecture."""


def load_clip_tokenizer(folder):
    """The SD1.5 CLIP tokenizer from a folder with vocab.json and merges.txt (ComfyUI ships one as comfy/sd1_tokenizer)."""
    folder = Path(folder).expanduser()
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise EncoderFilesError(
            f"CLIP tokenizer folder {folder} is missing {', '.join(missing)}; expected the SD1.5 tokenizer "
            f"files {', '.join(TOKENIZER_FILES)} (ComfyUI's comfy/sd1_tokenizer, or the tokenizer/ folder of an "
            "SD1.5 diffusers model)"
        )
    transformers = require("transformers", "The Arc2Face ID encoder")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .bin/.pt read with ``weights_only=True``."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderFilesError(f"{path} does not hold a flat state dict of tensors")
    return state


def convert_layout(state_dict: dict, legacy: bool) -> dict:
    """Keys of either CLIPTextModel layout in the one asked for (``legacy``: transformers 4's ``text_model.*``).

    ``position_ids`` is a non-persistent buffer that older transformers saved; it is dropped.
    """
    state = {key: value for key, value in state_dict.items() if not key.endswith("position_ids")}
    prefixed = [key.startswith(LEGACY_PREFIX) for key in state]
    if any(prefixed) and not all(prefixed):
        raise EncoderFilesError("the weights mix keys with and without the 'text_model.' prefix")
    if all(prefixed) and not legacy:
        return {key[len(LEGACY_PREFIX):]: value for key, value in state.items()}
    if not any(prefixed) and legacy:
        return {LEGACY_PREFIX + key: value for key, value in state.items()}
    return state


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise EncoderFilesError(
        f"Arc2Face ID encoder folder {folder} has no weights: expected config.json and "
        f"{' or '.join(reversed(WEIGHT_FILES))}. Get them from {ENCODER_SOURCE}."
    )


def _describe_mismatch(model_state: dict, state: dict) -> str:
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    shapes = [
        f"{key} {tuple(state[key].shape)} (model {tuple(model_state[key].shape)})"
        for key in sorted(set(state) & set(model_state))
        if tuple(state[key].shape) != tuple(model_state[key].shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            parts.append(f"{label} keys: {shown}")
    return "; ".join(parts)


def load_text_encoder(folder, dtype: torch.dtype = torch.float32, device="cpu"):
    """The fine-tuned ``CLIPTextModel`` from a folder in the published layout, loaded strictly."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise EncoderFilesError(
            f"Arc2Face ID encoder folder {folder} has no config.json; expected config.json and "
            f"pytorch_model.bin or model.safetensors. Get them from {ENCODER_SOURCE}."
        )
    weights = _weights_file(folder)
    transformers = require("transformers", "The Arc2Face ID encoder")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in CONFIG_MODEL_TYPES:
            raise ValueError(f"its model_type is {model_type!r}, not one of {', '.join(CONFIG_MODEL_TYPES)}")
        config = transformers.CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        raise EncoderFilesError(
            f"{folder / 'config.json'} is not a CLIP text-encoder config ({error}). Expected the Arc2Face ID "
            f"encoder, {ENCODER_SOURCE}."
        ) from error
    # Built on the meta device: random initialisation of the real model takes seconds and every
    # weight is replaced anyway.
    with torch.device("meta"):
        model = transformers.CLIPTextModel(config)
    model_state = model.state_dict()
    legacy = any(key.startswith(LEGACY_PREFIX) for key in model_state)
    try:
        state = convert_layout(read_state_dict(weights), legacy)
    except Exception as error:
        raise EncoderFilesError(f"could not read the weights {weights}: {error}") from error
    mismatch = _describe_mismatch(model_state, state)
    if mismatch:
        raise EncoderFilesError(
            f"{weights} does not fit the CLIPTextModel described by {folder / 'config.json'}: {mismatch}. "
            f"Expected the Arc2Face ID encoder, {ENCODER_SOURCE}."
        )
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_position_ids(model)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _rebuild_position_ids(model) -> None:
    """Non-persistent buffers are not in the file, so they are still on the meta device; CLIP has one."""
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type != "meta":
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"the installed transformers' CLIPTextModel has a buffer {name} this loader does not know")
        owner, _, attribute = name.rpartition(".")
        value = torch.arange(buffer.shape[-1]).expand(buffer.shape).contiguous()
        model.get_submodule(owner).register_buffer(attribute, value, persistent=False)


class Arc2FaceIDEncoder:
    """ArcFace embeddings (B x E, E <= D) -> positive conditioning B x 77 x D; :meth:`encode_negative` for the negative."""

    def __init__(self, text_model, tokenizer, negative: torch.Tensor | None = None):
        self.text_model = text_model
        # A fixed negative (1 x 77 x D) kept beside a fine-tuned encoder (FaceCrafter's joint stage
        # trains the encoder but keeps the original encoder's negative); None: the encoder on "".
        self.negative = None if negative is None else negative.detach().float().reshape(1, -1, negative.shape[-1])
        self.tokenizer = tokenizer
        self.sequence_length = int(text_model.config.max_position_embeddings)
        self.hidden_size = int(text_model.config.hidden_size)
        id_tokens = tokenizer.encode(ID_WORD, add_special_tokens=False)
        if len(id_tokens) != 1:
            raise EncoderFilesError(f"the tokenizer splits {ID_WORD!r} into {len(id_tokens)} tokens; expected one (SD1.5 CLIP)")
        self.id_token = id_tokens[0]
        self.prompt_ids = self._tokenize(ID_PROMPT)
        self.empty_ids = self._tokenize("")
        if int((self.prompt_ids == self.id_token).sum()) != 1:
            raise EncoderFilesError(f"the prompt {ID_PROMPT!r} must hold the {ID_WORD!r} token exactly once")

    @classmethod
    def from_folders(cls, encoder_folder, tokenizer_folder, dtype: torch.dtype = torch.float32, device="cpu"):
        negative_file = Path(encoder_folder).expanduser() / NEGATIVE_FILE
        negative = read_state_dict(negative_file)["negative"] if negative_file.is_file() else None
        return cls(load_text_encoder(encoder_folder, dtype, device), load_clip_tokenizer(tokenizer_folder), negative)

    def _tokenize(self, text: str) -> torch.Tensor:
        # Always the encoder's 77 positions: ComfyUI's sd1_tokenizer config says model_max_length 8192.
        return self.tokenizer(
            text, padding="max_length", max_length=self.sequence_length, truncation=True, return_tensors="pt"
        ).input_ids

    @property
    def device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    @property
    def id_position(self) -> int:
        return int((self.prompt_ids[0] == self.id_token).nonzero()[0, 0])

    def to(self, device=None, dtype=None) -> Arc2FaceIDEncoder:
        self.text_model.to(device=device, dtype=dtype)
        return self

    def _check_embeddings(self, id_embeddings) -> torch.Tensor:
        vectors = torch.as_tensor(id_embeddings).detach().to(dtype=torch.float32)
        if vectors.dim() == 1:
            vectors = vectors[None]
        if vectors.dim() != 2 or vectors.shape[0] == 0:
            raise ValueError(f"ID embeddings must be B x E; got shape {tuple(vectors.shape)}")
        if vectors.shape[1] > self.hidden_size:
            raise ValueError(
                f"ID embeddings are {vectors.shape[1]}-d but the encoder's token embeddings are "
                f"{self.hidden_size}-d; they are zero-padded, never truncated"
            )
        finite = torch.isfinite(vectors).all(dim=1)
        norms = vectors.norm(dim=1)
        bad = [int(i) for i in (~finite | (norms == 0)).nonzero().flatten()]
        if bad:
            raise ValueError(f"ID embeddings are zero or not finite in batch {rows_text(bad)} (counting from 1)")
        return F.pad(vectors / norms[:, None], (0, self.hidden_size - vectors.shape[1]))

    @contextmanager
    def _id_token_replaced(self, mask: torch.Tensor, rows: torch.Tensor):
        calls = []

        def replace(module, args, output):
            calls.append(1)
            output = output.clone()
            output[mask.to(output.device)] = rows.to(device=output.device, dtype=output.dtype)
            return output

        # A hook on the token-embedding layer works the same in transformers 4 and 5, whose
        # CLIPTextModel.forward signatures differ (only 4's embeddings accept inputs_embeds there).
        handle = self.text_model.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()
        if len(calls) != 1:
            raise RuntimeError("the text encoder did not look up its token embeddings once; cannot insert the ID")

    @torch.no_grad()
    def encode(self, id_embeddings) -> torch.Tensor:
        """Positive conditioning, float32 B x 77 x D on the encoder's device, one row per embedding."""
        return self.encode_differentiable(id_embeddings)

    def encode_differentiable(self, id_embeddings) -> torch.Tensor:
        """:meth:`encode` with the autograd graph through the text model (the ArcFace vectors stay constants),
        for training the encoder (FaceCrafter's joint stage)."""
        rows = self._check_embeddings(id_embeddings)
        ids = self.prompt_ids.repeat(rows.shape[0], 1).to(self.device)
        with self._id_token_replaced(ids == self.id_token, rows):
            hidden = self.text_model(input_ids=ids).last_hidden_state
        return hidden.float()

    @torch.no_grad()
    def encode_negative(self, batch_size: int = 1) -> torch.Tensor:
        """Negative conditioning: the encoder on the empty prompt (or the fixed negative), float32 batch_size x 77 x D."""
        if self.negative is not None:
            return self.negative.to(self.device).expand(batch_size, -1, -1).clone()
        hidden = self.text_model(input_ids=self.empty_ids.to(self.device)).last_hidden_state.float()
        return hidden.expand(batch_size, -1, -1).clone()
