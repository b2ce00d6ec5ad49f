"""The E-Adapter inside ComfyUI's own UNets, checked against diffusers' own multi-IP-Adapter path.

Independent check: diffusers' ``UNet2DConditionModel._load_ip_adapter_weights([faceid, image])`` (code we
did not write) loads the same published-layout stand-in files, with per-layer scales (on SDXL the image
adapter's scale is 0 outside ``up_blocks.0.attentions.1``); its output must equal our ComfyUI patch for
both CFG row orders and CFG 1. The unconditional rows get zero embeddings, which diffusers projects
(IP-Adapter's convention, ours too). Tiny UNets carry the same weights in both hosts.
"""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from adapters.e_adapter import EAdapter
from adapters.layers import select_layers
from hosts.diffusers import attach_adapters
from support.e_adapter_standins import LAYOUTS, write_published
from support.two_hosts import Hosts as TwoHosts

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
COND, UNCOND = 0, 1


@cache
def Hosts(family: str, batch: int):  # noqa: N802 - building tiny UNets in two hosts is the slow part: share them
    return TwoHosts(family, batch)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folders = {}
    for family in ("SD1.5", "SDXL"):
        folder = tmp_path_factory.mktemp(family.replace(".", ""))
        folders[family] = write_published(folder, family)
    return folders


def e_adapter(published, family, **kwargs) -> EAdapter:
    return EAdapter.from_published(*published[family], **kwargs).eval()


def conditions(batch: int, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, 512, generator=generator), dim=-1), torch.randn(batch, 1024, generator=generator)


def apply(comfy, model, adapter, id_embeddings=None, image_embeds=None, **options):
    return comfy.pack.nodes.e_adapter_nodes.apply_e_adapter(model, adapter, id_embeddings, image_embeds, **options)


def diffusers_reference(hosts, published, family, order, id_embeddings, image_embeds, id_scale=1.0, expression_scale=1.0):
    """diffusers' own IP-Adapter processors: FaceID file as adapter 0, image file as adapter 1."""
    unet = copy.deepcopy(hosts.unet)
    state_dicts = [torch.load(path, weights_only=True) for path in published[family]]
    unet._load_ip_adapter_weights(state_dicts)
    expression_layers = {layer.diffusers_name for layer in select_layers(LAYOUTS[family], "all" if family == "SD1.5"
                                                                          else "emojidiff_expression_sdxl")}
    for name, processor in unet.attn_processors.items():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [id_scale, expression_scale if name.removesuffix(".processor") in expression_layers else 0.0]
    chunk = id_embeddings.shape[0]
    id_rows = torch.cat([id_embeddings if kind == COND else torch.zeros_like(id_embeddings) for kind in order])
    clip_rows = torch.cat([image_embeds if kind == COND else torch.zeros_like(image_embeds) for kind in order])
    added = dict(hosts.added or {})
    added["image_embeds"] = [id_rows[:, None], clip_rows[:, None]]
    assert hosts.batch == chunk * len(order)
    with torch.no_grad():
        return unet(hosts.x, hosts.t, encoder_hidden_states=hosts.context, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
@pytest.mark.parametrize("order", [[UNCOND, COND], [COND, UNCOND], [COND]], ids=["uncond_first", "cond_first", "cfg_1"])
def test_comfy_patch_equals_diffusers_multi_ip_adapter(comfy, published, family, order):
    hosts = Hosts(family, batch=2 * len(order))
    adapter = e_adapter(published, family)
    id_embeddings, image_embeds = conditions(2)
    patched = apply(comfy, hosts.model, adapter, id_embeddings, image_embeds, lora_strength=0.0)
    ours = hosts.comfy(patched, cond_or_uncond=order)
    reference = diffusers_reference(hosts, published, family, order, id_embeddings, image_embeds)
    plain = hosts.comfy(cond_or_uncond=order)
    assert (ours - plain).abs().max() > 1e-2  # the branches do something
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)

    # the expression branch sits exactly on its layer set: 16 on SD1.5, up_blocks.0.attentions.1 on SDXL
    registered = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    expected_keys = {layer.comfy_key for layer in adapter.identity.layers}
    replaced = {key: comfy.pack.hosts.comfyui.stacking.replace_below(registered, key) for key in expected_keys}  # what ComfyUI calls for each layer
    assert len(registered) == len(expected_keys) and all(patch.key == key for key, patch in replaced.items())
    expression_keys = {key for key, patch in replaced.items() if "expression image" in patch.cache.conditions}
    assert expression_keys == {layer.comfy_key for layer in adapter.expression_branch().layers}
    assert len(expression_keys) == (16 if family == "SD1.5" else 10)
    if family == "SDXL":
        assert expression_keys == {("output", 1, i) for i in range(10)}


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
def test_diffusers_host_runs_the_e_adapter_like_diffusers(comfy, published, family):
    """Our diffusers host (training uses it) against diffusers' own processors, strengths not 1."""
    hosts = Hosts(family, batch=4)
    adapter = e_adapter(published, family)
    id_embeddings, image_embeds = conditions(2, seed=9)
    order = [UNCOND, COND]
    reference = diffusers_reference(hosts, published, family, order, id_embeddings, image_embeds, 0.7, 1.3)
    unet = copy.deepcopy(hosts.unet)
    attach_adapters(unet, adapter.named_adapters())
    with torch.no_grad():
        id_tokens = torch.cat([adapter.unconditional_id_tokens().expand(2, -1, -1), adapter.id_tokens(id_embeddings)])
        exp_tokens = torch.cat([adapter.unconditional_expression_tokens().expand(2, -1, -1), adapter.expression_tokens(image_embeds)])
        ours = unet(hosts.x, hosts.t, encoder_hidden_states=hosts.context, added_cond_kwargs=hosts.added,
                    cross_attention_kwargs={"adapter_tokens": {"id": id_tokens, "expression": exp_tokens},
                                            "adapter_scale": {"id": 0.7, "expression": 1.3}}).sample
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    patched = apply(comfy, hosts.model, adapter, id_embeddings, image_embeds, id_strength=0.7, expression_strength=1.3,
                    lora_strength=0.0)
    torch.testing.assert_close(hosts.comfy(patched, cond_or_uncond=order), ours, atol=1e-4, rtol=1e-4)


def merged_lora_unet(unet, adapter, strength):
    """The hand formula: W + strength x up @ down on every LoRA module (FaceID's LoRA has scale 1)."""
    unet = copy.deepcopy(unet)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, weights in adapter.lora.items():
            modules[name].weight += strength * (weights.up @ weights.down)
    return unet


def test_faceid_lora_goes_through_comfy_weight_patching_with_its_own_strength(comfy, published, tmp_path):
    hosts = Hosts("SD1.5", batch=2)
    adapter = e_adapter(published, "SD1.5")
    id_embeddings, image_embeds = conditions(1)
    patched = apply(comfy, hosts.model, adapter, id_embeddings, image_embeds, lora_strength=0.6)
    assert len(patched.patches) == 32 * 4  # to_q, to_k, to_v, to_out.0 of every attention layer
    unet = merged_lora_unet(hosts.unet, adapter, 0.6)
    attach_adapters(unet, adapter.named_adapters())
    with torch.no_grad():
        tokens = {"id": torch.cat([adapter.unconditional_id_tokens(), adapter.id_tokens(id_embeddings)]),
                  "expression": torch.cat([adapter.unconditional_expression_tokens(), adapter.expression_tokens(image_embeds)])}
        expected = unet(hosts.x, hosts.t, encoder_hidden_states=hosts.context,
                        cross_attention_kwargs={"adapter_tokens": tokens}).sample
    torch.testing.assert_close(hosts.comfy(patched, cond_or_uncond=[UNCOND, COND]), expected, atol=1e-4, rtol=1e-4)

    # the same LoRA as a separate file in the form ComfyUI's LoRA loader reads (kohya names), through ComfyUI's loader
    from safetensors.torch import save_file

    kohya = {}
    for module, weights in adapter.lora.items():
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = weights.down.contiguous()
        kohya[f"{name}.lora_up.weight"] = weights.up.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(weights.rank))
    lora_file = tmp_path / "ip-adapter-faceid_sd15_lora.safetensors"
    save_file(kohya, str(lora_file))
    from_file = comfy.pack.hosts.comfyui.e_adapter.apply_lora_file(
        apply(comfy, hosts.model, adapter, id_embeddings, image_embeds, lora_strength=0.0), str(lora_file), 0.6)
    torch.testing.assert_close(hosts.comfy(from_file, cond_or_uncond=[UNCOND, COND]), expected, atol=1e-4, rtol=1e-4)


def test_either_condition_may_be_left_out(comfy, published):
    hosts = Hosts("SD1.5", batch=2)
    adapter = e_adapter(published, "SD1.5")
    id_embeddings, image_embeds = conditions(1)
    id_only = apply(comfy, hosts.model, adapter, id_embeddings, None, lora_strength=0.0)
    exp_only = apply(comfy, hosts.model, adapter, None, image_embeds, lora_strength=0.0)
    both = apply(comfy, hosts.model, adapter, id_embeddings, image_embeds, lora_strength=0.0)
    plain = hosts.comfy(cond_or_uncond=[UNCOND, COND])
    delta = lambda model: hosts.comfy(model, cond_or_uncond=[UNCOND, COND]) - plain  # noqa: E731
    assert delta(id_only).abs().max() > 1e-2 and delta(exp_only).abs().max() > 1e-2
    assert (delta(both) - delta(id_only) - delta(exp_only)).abs().max() > 1e-4  # the UNet is not linear in its branches
    with pytest.raises(ValueError, match="needs an identity embedding, a CLIP vision output"):
        apply(comfy, hosts.model, adapter)


def test_bad_inputs_are_refused_clearly(comfy, published):
    hosts = Hosts("SD1.5", batch=2)
    sdxl = e_adapter(published, "SDXL")
    id_embeddings, image_embeds = conditions(1)
    with pytest.raises(ValueError, match=r"was made for SDXL models, but the model is SD1.5"):
        apply(comfy, hosts.model, sdxl, id_embeddings, image_embeds)
    adapter = e_adapter(published, "SD1.5")
    antelope = id_embeddings.clone()
    antelope.recognizer = "arcface.onnx"
    with pytest.raises(ValueError, match=r"made by arcface.onnx.*trained on w600k_r50.onnx.*in Load InsightFace set "
                                         r"recognizer to buffalo_l/w600k_r50.onnx"):
        apply(comfy, hosts.model, adapter, antelope, image_embeds)
    buffalo = id_embeddings.clone()
    buffalo.recognizer = "w600k_r50.onnx"
    apply(comfy, hosts.model, adapter, buffalo, image_embeds)
    with pytest.raises(ValueError, match=r"1280-d, from ViT-bigG/14: load ViT-H/14 in Load CLIP Vision"):
        apply(comfy, hosts.model, adapter, id_embeddings, torch.randn(1, 1280))
    with pytest.raises(ValueError, match=r"NaN or infinite values in image\(s\) \[1\]"):
        apply(comfy, hosts.model, adapter, id_embeddings * float("nan"), image_embeds)


def test_batch_rows_one_for_all_or_one_per_image(comfy, published):
    hosts = Hosts("SD1.5", batch=4)
    adapter = e_adapter(published, "SD1.5")
    id_embeddings, image_embeds = conditions(1)
    one = apply(comfy, hosts.model, adapter, id_embeddings, image_embeds, lora_strength=0.0)
    repeated = apply(comfy, hosts.model, adapter, id_embeddings.repeat(2, 1), image_embeds.repeat(2, 1), lora_strength=0.0)
    torch.testing.assert_close(hosts.comfy(one, cond_or_uncond=[UNCOND, COND]),
                               hosts.comfy(repeated, cond_or_uncond=[UNCOND, COND]), atol=1e-5, rtol=1e-5)
    three = apply(comfy, hosts.model, adapter, *conditions(3), lora_strength=0.0)
    with pytest.raises(ValueError, match="the identity embedding has 3 rows but the batch has 2 images: give one row "
                                         "for the whole batch or one per image"):
        hosts.comfy(three, cond_or_uncond=[UNCOND, COND])
    mixed = apply(comfy, hosts.model, adapter, id_embeddings, conditions(3)[1], lora_strength=0.0)
    with pytest.raises(ValueError, match="the expression image has 3 rows but the batch has 2 images"):
        hosts.comfy(mixed, cond_or_uncond=[UNCOND, COND])
