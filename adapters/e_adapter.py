"""EmojiDiff's E-Adapter: an identity branch and an expression branch sharing each layer's query.

Paper Eqs. 4-5: output = text attention + lambda_id x ID attention + lambda_exp x expression attention,
three separate softmaxes over the same query. Each branch is an IP-Adapter-shaped
:class:`CrossAttentionAdapter`:

- ID branch (IP-Adapter-FaceID form): a 512-d L2-normalised ArcFace embedding (insightface buffalo_l
  ``w600k_r50.onnx``, the recogniser FaceID was trained with) -> MLP projection -> 4 tokens ->
  bias-free ``to_k_ip``/``to_v_ip`` on every cross-attention layer.
- Expression branch (IP-Adapter image form): CLIP vision ``image_embeds`` of the EmojiDiff local image
  (ViT-H/14, 1024-d, by default; ViT-bigG/14, 1280-d, accepted) -> Linear + LayerNorm -> 4 tokens ->
  ``to_k_ip``/``to_v_ip`` on the expression layers only: a named set of ``adapters.layers.LAYER_SETS``
  (all 16 on SD1.5, ``up_blocks.0.attentions.1`` on SDXL).

Unconditional rows get each branch's projection of a zero embedding (IP-Adapter's convention; the
paper is silent, this is our choice).

Files:
- ours: one safetensors, ``id.image_proj.*``, ``id.ip_adapter.<N>.to_{k,v}_ip.weight`` (every layer),
  ``exp.image_proj.*``, ``exp.ip_adapter.<N>...`` (the expression layers only); metadata ``kind``,
  ``layout``, ``expression_layers``, ``clip_vision``, ``id_recognizer``.
- assembled from the published files, which is also how training initialises: an IP-Adapter FaceID
  checkpoint (``ip-adapter-faceid_sd15.bin`` / ``_sdxl.bin``) and an image checkpoint
  (``ip-adapter_sd15.bin`` / ``ip-adapter_sdxl_vit-h.bin``). The FaceID ``.bin`` also holds the rank-128
  LoRA it was trained with (``ip_adapter.<N>.to_{q,k,v,out}_lora.{down,up}.weight``, N over every
  attention processor): it is split off into :attr:`EAdapter.lora`, keyed by diffusers module name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .checkpoints import (
    AdapterFileError,
    read_safetensors_metadata,
    read_state_dict,
    split_prefix,
    write_safetensors,
)
from .cross_attention_adapter import CrossAttentionAdapter
from .layers import LAYER_SETS, LAYOUTS, SD15, SDXL, UNetLayout, attention_layers, select_layers
from .lora import LoraWeights
from .projections import MLPProjection, TokenProjection

ID_DIM = 512
# CLIP vision image_embeds width -> the model that gives it, for messages and metadata.
CLIP_VISION_MODELS = {768: "ViT-L/14", 1024: "ViT-H/14", 1280: "ViT-bigG/14"}
CLIP_VISION_TAGS = {1024: "vit-h", 1280: "bigG"}
CLIP_VISION_FILES = {
    1024: "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (h94/IP-Adapter models/image_encoder)",
    1280: "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors (h94/IP-Adapter sdxl_models/image_encoder)",
}
DEFAULT_RECOGNIZER = "w600k_r50.onnx"
# Our choice where the paper is silent: the expression layers by base model ("auto").
DEFAULT_EXPRESSION_LAYERS = {SD15.name: "all", SDXL.name: "emojidiff_expression_sdxl"}
KIND = "EmojiDiff E-Adapter"

_LORA_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LORA_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def default_expression_layers(layout: UNetLayout) -> str:
    return DEFAULT_EXPRESSION_LAYERS[layout.name]


def clip_vision_model(width: int) -> str:
    return CLIP_VISION_MODELS.get(width, f"a CLIP vision model with {width}-d image_embeds")


class IdentityBranch(CrossAttentionAdapter):
    """The ID branch: IP-Adapter-FaceID's MLP projection of a 512-d ArcFace embedding."""

    kind = "IP-Adapter FaceID (E-Adapter ID branch)"

    def _check(self, path) -> None:
        if not isinstance(self.image_proj, MLPProjection) or self.image_proj.in_dim != ID_DIM:
            found = f"a {type(self.image_proj).__name__} of {self.image_proj.in_dim} inputs"
            hint = " (this looks like an image IP-Adapter: give it as the expression file)" if isinstance(
                self.image_proj, TokenProjection) else ""
            raise AdapterFileError(path, self.kind, self.layout.name,
                                   f"expected an MLP projection ('proj.0', 'proj.2', 'norm') of {ID_DIM} ArcFace inputs, "
                                   f"found {found}{hint}")


class ExpressionBranch(CrossAttentionAdapter):
    """The expression branch: IP-Adapter's image projection of CLIP vision ``image_embeds``."""

    kind = "IP-Adapter image (E-Adapter expression branch)"

    def _check(self, path) -> None:
        if not isinstance(self.image_proj, TokenProjection) or self.image_proj.in_dim not in CLIP_VISION_TAGS:
            found = f"a {type(self.image_proj).__name__} of {self.image_proj.in_dim} inputs"
            hint = " (this looks like a FaceID IP-Adapter: give it as the ID file)" if isinstance(
                self.image_proj, MLPProjection) else ""
            raise AdapterFileError(path, self.kind, self.layout.name,
                                   "expected a Linear + LayerNorm projection ('proj', 'norm') of 1024 (CLIP ViT-H/14) or "
                                   f"1280 (ViT-bigG/14) inputs, found {found}{hint}")

    @property
    def clip_width(self) -> int:
        return self.image_proj.in_dim


def subset(adapter: CrossAttentionAdapter, layers) -> CrossAttentionAdapter:
    """The same adapter restricted to ``layers`` (sharing its modules and weights)."""
    numbers = {layer.checkpoint_number for layer in layers}
    missing = numbers - {layer.checkpoint_number for layer in adapter.layers}
    if missing:
        raise ValueError(f"{adapter.kind} has no keys/values for layers {sorted(missing)[:8]} "
                         f"(it holds {len(adapter.layers)} layers)")
    view = type(adapter).__new__(type(adapter))
    torch.nn.Module.__init__(view)
    view.layout = adapter.layout
    view.image_proj = adapter.image_proj
    view.ip_adapter = torch.nn.ModuleDict({str(n): adapter.ip_adapter[str(n)] for n in sorted(numbers)})
    view.layers = tuple(layer for layer in adapter.layers if layer.checkpoint_number in numbers)
    return view


def split_faceid_lora(ip_adapter: Mapping[str, torch.Tensor], layout: UNetLayout, path) -> tuple[dict, dict[str, LoraWeights]]:
    """Separate FaceID's LoRA keys from its ``to_k_ip``/``to_v_ip`` keys.

    Returns (branch keys, {diffusers module name: LoraWeights}). LoRA number N is the N-th attention
    processor in diffusers order, which is the catalogue's checkpoint number.
    """
    layers = {layer.checkpoint_number: layer for layer in attention_layers(layout)}
    branch, sides = {}, {}
    for key, tensor in ip_adapter.items():
        match = _LORA_KEY.match(key)
        if match is None:
            branch[key] = tensor
            continue
        number = int(match.group(1))
        if number not in layers:
            raise AdapterFileError(path, IdentityBranch.kind, layout.name, f"LoRA key {key}: {layout.name} has no attention "
                                   f"processor {number}")
        module = f"{layers[number].diffusers_name}.{_LORA_TARGETS[match.group(2)]}"
        sides.setdefault(module, {})[match.group(3)] = tensor
    lora = {}
    for module, pair in sides.items():
        if set(pair) != {"down", "up"}:
            raise AdapterFileError(path, IdentityBranch.kind, layout.name, f"LoRA for {module} has only its {'/'.join(pair)} matrix")
        lora[module] = LoraWeights(pair["down"], pair["up"])
    return branch, lora


class FaceIDLora:
    """The LoRA a FaceID file carries, keyed by diffusers module name (the form hosts' LoRA helpers take)."""

    kind = "IP-Adapter FaceID LoRA"

    def __init__(self, modules: dict[str, LoraWeights]):
        self.modules = modules


class EAdapter(torch.nn.Module):
    """Both branches plus what the file says about them."""

    kind = KIND
    default_id_strength = 1.0  # lambda_id ([ED supp B.1])
    default_expression_strength = 1.0  # lambda_exp

    def __init__(self, identity: IdentityBranch, expression: ExpressionBranch, expression_layers: str | None = None,
                 id_recognizer: str = DEFAULT_RECOGNIZER, lora: dict[str, LoraWeights] | None = None):
        super().__init__()
        if identity.layout.name != expression.layout.name:
            raise ValueError(f"the ID branch is for {identity.layout.name} but the expression branch for {expression.layout.name}")
        self.identity = identity
        self.expression = expression
        self.expression_layers = expression_layers or default_expression_layers(identity.layout)
        if self.expression_layers not in LAYER_SETS:
            raise ValueError(f"unknown expression layer set {self.expression_layers!r}; known: {', '.join(LAYER_SETS)}")
        self.id_recognizer = id_recognizer
        self.lora = dict(lora or {})
        self.lora_file: str | None = None  # a separate FaceID LoRA file, for hosts that load LoRA files themselves

    @property
    def layout(self) -> UNetLayout:
        return self.identity.layout

    def lora_weights(self) -> FaceIDLora:
        return FaceIDLora(self.lora)

    @property
    def clip_vision(self) -> str:
        return CLIP_VISION_TAGS[self.expression.clip_width]

    def expression_branch(self, layer_set: str = "auto") -> ExpressionBranch:
        """The expression branch on ``layer_set`` ("auto": the adapter's own set)."""
        name = self.expression_layers if layer_set == "auto" else layer_set
        try:
            layers = select_layers(self.layout, name)
            if not layers:  # the photo would change nothing: say so instead of running without it
                raise ValueError(f"it selects no cross-attention layer of the {self.layout.name} UNet")
            return subset(self.expression, layers)
        except ValueError as error:
            raise ValueError(f"expression layers {name!r}: {error}; this adapter's file holds the set "
                             f"{self.expression_layers!r} (an adapter assembled from the published image IP-Adapter "
                             "holds every layer)") from None

    def named_adapters(self, layer_set: str = "auto") -> dict[str, CrossAttentionAdapter]:
        """For ``hosts.diffusers.attach_adapters``: tokens go in as ``{"id": ..., "expression": ...}``."""
        return {"id": self.identity, "expression": self.expression_branch(layer_set)}

    def compact_branches(self) -> EAdapter:
        """Each key/value weight kept in fp16 where that changes no value (the published files are fp16):
        half the memory for inference, the same keys and values (:class:`KeyValueBranch` computes them
        in the query's dtype). Weights that fp16 cannot hold exactly (trained in fp32) stay as they are."""
        for adapter in (self.identity, self.expression):
            for branch in adapter.ip_adapter.values():
                for linear in (branch.to_k_ip, branch.to_v_ip):
                    weight = linear.weight.data
                    if weight.dtype == torch.float32:
                        half = weight.half()
                        if torch.equal(half.float(), weight):
                            linear.weight.data = half
        return self

    # -- tokens -------------------------------------------------------------------------------

    def id_tokens(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, 512) ArcFace embeddings -> (batch, 4, D)."""
        embeddings = torch.as_tensor(embeddings)
        if embeddings.dim() != 2 or embeddings.shape[1] != ID_DIM:
            raise ValueError(f"the E-Adapter's ID branch takes ArcFace embeddings of shape (batch, {ID_DIM}); got "
                             f"{tuple(embeddings.shape)}")
        _check_finite(embeddings, "ArcFace embedding")
        return self.identity.project(embeddings)

    def expression_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(batch, 1024 or 1280) CLIP vision ``image_embeds`` -> (batch, 4, D)."""
        image_embeds = torch.as_tensor(image_embeds)
        width = self.expression.clip_width
        if image_embeds.dim() != 2:
            raise ValueError(f"CLIP vision image_embeds must have shape (batch, {width}); got {tuple(image_embeds.shape)}")
        if image_embeds.shape[1] != width:
            raise ValueError(
                f"this E-Adapter's expression branch takes {width}-d CLIP image embeddings from {clip_vision_model(width)} "
                f"({CLIP_VISION_FILES[width]}), but the CLIP vision output is {image_embeds.shape[1]}-d, from "
                f"{clip_vision_model(image_embeds.shape[1])}: load {clip_vision_model(width)} in Load CLIP Vision")
        _check_finite(image_embeds, "CLIP vision embedding")
        return self.expression.project(image_embeds)

    def unconditional_id_tokens(self) -> torch.Tensor:
        return self.identity.project(torch.zeros(1, ID_DIM))

    def unconditional_expression_tokens(self) -> torch.Tensor:
        return self.expression.project(torch.zeros(1, self.expression.clip_width))

    # -- files --------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"kind": self.kind, "layout": self.layout.name, "expression_layers": self.expression_layers,
                "clip_vision": self.clip_vision, "id_recognizer": self.id_recognizer}

    def save(self, path) -> None:
        """Our format: both branches under ``id.``/``exp.``, the expression branch on its layer set only.
        The FaceID LoRA is not saved here: it stays in its own published file."""
        expression = self.expression_branch("auto")
        state = {f"id.{k}": v for k, v in self.identity.state_dict().items()}
        state |= {f"exp.{k}": v for k, v in expression.state_dict().items()}
        write_safetensors(state, path, metadata=self.metadata())

    @classmethod
    def from_file(cls, path) -> EAdapter:
        """Our safetensors file (``id.*`` and ``exp.*``)."""
        state = read_state_dict(path)
        metadata = read_safetensors_metadata(path)
        identity_state, expression_state = split_prefix(state, "id"), split_prefix(state, "exp")
        if not identity_state or not expression_state:
            found = sorted({key.split(".")[0] for key in state})
            hint = (" It looks like a single IP-Adapter file: load it as the FaceID or the image file instead."
                    if "image_proj" in found else "")
            raise AdapterFileError(path, KIND, "SD1.5 or SDXL", f"expected 'id.' and 'exp.' sections, found {found}.{hint}")
        layout = LAYOUTS.get(metadata.get("layout", ""))
        identity = IdentityBranch.from_state_dict(identity_state, path, layout)
        expression = ExpressionBranch.from_state_dict(expression_state, path, identity.layout)
        layer_set = metadata.get("expression_layers") or default_expression_layers(identity.layout)
        adapter = cls(identity, expression, layer_set, metadata.get("id_recognizer", DEFAULT_RECOGNIZER))
        adapter.expression_branch("auto")  # the file must hold every layer of its own set
        return adapter

    @classmethod
    def from_published(cls, faceid_path, image_path, expression_layers: str | None = None,
                       layout: UNetLayout | None = None) -> EAdapter:
        """Assemble from a published IP-Adapter FaceID file and an image IP-Adapter file.

        The image adapter keeps every layer's keys/values, so any expression layer set can be chosen
        when applying; :meth:`save` writes only the chosen set.
        """
        faceid = read_state_dict(faceid_path)
        ip_adapter = split_prefix(faceid, "ip_adapter")
        layout = layout or _layout_of(ip_adapter, faceid_path)
        branch_keys, lora = split_faceid_lora(ip_adapter, layout, faceid_path)
        identity_state = {f"image_proj.{k}": v for k, v in split_prefix(faceid, "image_proj").items()}
        identity_state |= {f"ip_adapter.{k}": v for k, v in branch_keys.items()}
        identity = IdentityBranch.from_state_dict(identity_state, faceid_path, layout)
        expression = ExpressionBranch.from_state_dict(read_state_dict(image_path), image_path)
        if expression.layout.name != layout.name:
            raise AdapterFileError(image_path, ExpressionBranch.kind, layout.name,
                                   f"it is for {expression.layout.name} but the FaceID file is for {layout.name}")
        return cls(identity, expression, expression_layers, DEFAULT_RECOGNIZER, lora)


def _layout_of(ip_adapter: Mapping[str, torch.Tensor], path) -> UNetLayout:
    """SD1.5 or SDXL from the highest processor number of a FaceID file (SD1.5 has 32, SDXL 140)."""
    numbers = [int(key.split(".")[0]) for key in ip_adapter if key.split(".")[0].isdigit()]
    if not numbers:
        raise AdapterFileError(path, IdentityBranch.kind, "SD1.5 or SDXL", "no 'ip_adapter.<N>.*' keys")
    return SD15 if max(numbers) < len(attention_layers(SD15)) else SDXL


def _check_finite(values: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(values).reshape(values.shape[0], -1).all(dim=1)
    if not finite.all():
        rows = [int(i) + 1 for i in torch.nonzero(~finite).flatten()]
        raise ValueError(f"the {what} has NaN or infinite values in image(s) {rows} (counted from 1)")
