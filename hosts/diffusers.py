"""diffusers host for adapter branches: an attention processor for ``UNet2DConditionModel``.

Training and the tests import it as a top-level package (``hosts.diffusers``, beside ``adapters``), as
``training/`` imports everything; ComfyUI never loads it (the pack's host is ``hosts/comfyui``).

The processor runs the layer's own attention and adds each attached adapter's branch through
``adapters.branches``, the seam the ComfyUI patches use too. Branch conditions and the batch's row
layout travel per forward call in ``cross_attention_kwargs``, as in ComfyUI::

    condition = TokenCondition(adapter, tokens, adapter.unconditional_tokens(), strength)
    unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([text, empty]),
         cross_attention_kwargs={"adapter_conditions": {"expression": condition},
                                 "rows": RowLayout(2 * batch, [COND, UNCOND])})

or, for training batches whose rows are laid out already (per-sample condition dropout), as tokens::

    unet(latents, t, encoder_hidden_states=text,
         cross_attention_kwargs={"adapter_tokens": {"expression": tokens},   # (batch, T, D)
                                 "adapter_scale": {"expression": 1.0}})

The Reference Adapter's write/read path travels the same way, as a :class:`ReferenceBank`; what it
records is read as the seam's second kind of condition (``adapters.reference.ReferenceCondition``)::

    bank = ReferenceBank()
    reference_unet(ref_latent, 0, encoder_hidden_states=id_cond, cross_attention_kwargs={"reference": bank.writing()})
    unet(latents, t, encoder_hidden_states=cond, cross_attention_kwargs={"reference": bank.reading(layout)})

A dict passed as ``attention_record`` receives, per cross-attention layer with adapter branches,
the layer's attention output before ``to_out`` (the ID attention plus the scaled branches),
keyed by the layer's module name, with its autograd graph: FaceCrafter's AD loss reads it from
the training forward itself, without a second pass.

Every attention layer gets this processor (self-attention layers with no branches), so diffusers
passes the keyword arguments everywhere without warnings.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapters.attention import multi_head_attention
from adapters.branches import add_branch, is_off
from adapters.cross_attention_adapter import CrossAttentionAdapter
from adapters.layers import AttentionLayer
from adapters.reference import ReferenceCondition, ReferenceLayer, attend_with_reference
from adapters.rows import RowLayout


class PerRowTokens:
    """Tokens already laid out one row per batch row (training's batches, with per-sample dropout), as a
    branch condition (``adapters.branches``); ``scale`` a number or one per row (FaceCrafter's switches). The
    scale is kept a tensor, so every row is computed and the branch stays in the training graph."""

    def __init__(self, adapter, tokens: torch.Tensor, scale=1.0):
        self.adapter = adapter
        self.tokens = tokens
        self.scale = torch.as_tensor(scale, dtype=torch.float32)

    def keys_values(self, layer, layout: RowLayout, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.branch(layer).keys_values(self.tokens.to(device, dtype))

    def scales(self, layout: RowLayout, options=None):
        return self.scale


class ReferenceBank:
    """Self-attention inputs recorded by a Reference UNet pass ({module name: (references, tokens, width)}),
    read by the denoising UNet's passes as :attr:`condition`."""

    def __init__(self):
        self.mode: str | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.condition: ReferenceCondition | None = None
        self.layout: RowLayout | None = None

    def writing(self) -> ReferenceBank:
        self.mode, self.features = "write", {}
        return self

    def reading(self, rows: torch.Tensor | RowLayout) -> ReferenceBank:
        """``rows``: a :class:`RowLayout`, whose conditional chunks read the reference, as in ComfyUI; or a bool
        per batch row, True for the rows that read it (in row order they take reference 0, 1, ... or all the
        one reference)."""
        layout = rows if isinstance(rows, RowLayout) else None
        self.mode, self.layout = "read", layout
        self.condition = ReferenceCondition(self.features, None if layout is not None else rows)
        return self


class AdapterAttnProcessor:
    def __init__(self, name: str = "", branches: Mapping[str, tuple[CrossAttentionAdapter, AttentionLayer]] | None = None):
        self.name = name
        self.branches = dict(branches or {})  # {adapter name: (adapter, this layer)}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 adapter_tokens: Mapping[str, torch.Tensor] | None = None,
                 adapter_scale: Mapping[str, float] | None = None,
                 adapter_conditions: Mapping[str, object] | None = None, rows: RowLayout | None = None,
                 adapter_options: Mapping | None = None,
                 reference: ReferenceBank | None = None, attention_record: dict | None = None, **unused):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported by the adapter processor")
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        layout = rows or RowLayout(query.shape[0])
        if reference is not None and encoder_hidden_states is None:
            out = self._self_attention_with_reference(attn, hidden_states, query, key, value, reference, layout)
        else:
            out = multi_head_attention(query, key, value, attn.heads)
        for name, (adapter, layer) in self.branches.items():
            condition = (adapter_conditions or {}).get(name)
            if condition is None and (adapter_tokens or {}).get(name) is not None:
                condition = PerRowTokens(adapter, adapter_tokens[name], (adapter_scale or {}).get(name, 1.0))
            if condition is None:
                continue
            scales = condition.scales(layout, adapter_options)
            if not is_off(scales):
                key, value = condition.keys_values(layer, layout, query.device, query.dtype)
                out = add_branch(out, query, key, value, attn.heads, scales)
        if attention_record is not None and encoder_hidden_states is not None and self.branches:
            attention_record[self.name] = out
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _self_attention_with_reference(self, attn, hidden_states, query, key, value, reference: ReferenceBank,
                                       layout: RowLayout):
        if reference.mode == "write":
            reference.features[self.name] = hidden_states
            return multi_head_attention(query, key, value, attn.heads)
        layout = reference.layout or layout
        reads = reference.condition.scales(layout)
        read = (reference.condition.keys_values(ReferenceLayer(self.name, attn), layout, query.device, query.dtype)
                if reads.any() else (None, None))
        return attend_with_reference(query, key, value, reads, *read,
                                     lambda q, k, v, reading: multi_head_attention(q, k, v, attn.heads))


def attach_adapters(unet, adapters: Mapping[str, CrossAttentionAdapter] | None = None) -> None:
    """Install :class:`AdapterAttnProcessor` on every attention layer of ``unet``.

    ``adapters`` maps the names used in ``adapter_tokens`` to adapters; each adapter's branches go
    on the layers of its catalogue. The adapters stay separate modules (train them, move them
    with ``.to()``); the UNet holds only references through its processors.
    """
    adapters = adapters or {}
    module_names = {name.removesuffix(".processor") for name in unet.attn_processors}
    processors = {}
    for module_name in module_names:
        branches = {}
        for adapter_name, adapter in adapters.items():
            for layer in adapter.layers:
                if layer.diffusers_name == module_name:
                    branches[adapter_name] = (adapter, layer)
        processors[f"{module_name}.processor"] = AdapterAttnProcessor(module_name, branches)
    for adapter_name, adapter in adapters.items():
        missing = [layer.diffusers_name for layer in adapter.layers if layer.diffusers_name not in module_names]
        if missing:
            raise ValueError(f"adapter {adapter_name!r} ({adapter.layout.name}) has layers this UNet lacks: {missing[:4]}")
    unet.set_attn_processor(processors)


def facecrafter_kwargs(crafter, landmark_tokens: torch.Tensor | None, emotion_tokens: torch.Tensor | None,
                     alpha_lmk, alpha_emo) -> dict:
    """FaceCrafter's ``cross_attention_kwargs`` for :func:`attach_adapters` (``{"lmk": ..., "emo": ...}``).

    Tokens have one row per batch row; alphas are numbers or per-row tensors (the intra-batch switches).
    """
    tokens, scales = {}, {}
    for name, module_tokens, alpha in (("lmk", landmark_tokens, alpha_lmk), ("emo", emotion_tokens, alpha_emo)):
        if module_tokens is not None and getattr(crafter, name) is not None:
            tokens[name], scales[name] = module_tokens, alpha
    return {"adapter_tokens": tokens, "adapter_scale": scales}
