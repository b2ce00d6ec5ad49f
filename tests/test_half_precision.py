"""Every patch of ours on UNets built and computing in fp16 and bf16, as ComfyUI builds them on a GPU.

CI computes in float32 on the CPU; ComfyUI on a GPU builds the UNet in the half type its device prefers
and computes in it. Each patch runs on a tiny UNet whose weights are the float32 host's, cast: no dtype
error, finite output of the model's dtype, and the change the patch makes agrees with the float32 one up
to a small part of that change (the half-precision rounding of the plain UNet sets the scale).
"""

from __future__ import annotations

import gc
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from adapters.e_adapter import EAdapter
from support.e_adapter_standins import faceid_state, image_state
from support.tiny_facecrafter import landmark_images, random_facecrafter
from support.tiny_unets import (
    CONTEXT_DIM,
    comfy_model,
    random_expression_adapter,
    random_reference_lora_state,
)
from support.two_hosts import Hosts as TwoHosts

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
DTYPES = [torch.float16, torch.bfloat16]
ROW_ORDERS = ([1, 0], [0, 1])


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """The UNets and adapters built here are cached for this module only (later modules need the memory)."""
    yield
    for cached_builder in (Hosts, half_model, e_adapter):
        cached_builder.cache_clear()
    gc.collect()


@cache
def Hosts(family: str):  # noqa: N802 - shared: building the tiny UNets is the slow part
    return TwoHosts(family, batch=2)


@cache
def half_model(family: str, dtype: torch.dtype):
    return comfy_model(family, Hosts(family).unet.state_dict(), dtype)


@cache
def e_adapter(family: str, folder) -> EAdapter:
    faceid, image = folder / f"faceid_{family}.bin", folder / f"image_{family}.bin"
    torch.save(faceid_state(family), faceid)
    torch.save(image_state(family), image)
    return EAdapter.from_published(faceid, image).eval()


def patch(comfy, kind: str, model, family: str, folder):
    host = comfy.pack.hosts.comfyui
    generator = torch.Generator().manual_seed(3)
    if kind == "expression":
        adapter = random_expression_adapter(family)
        with torch.no_grad():
            tokens = adapter.expression_tokens(torch.randn(1, 55, generator=generator))
        return host.cross_attention.apply_cross_attention_branch(model, adapter, tokens, adapter.unconditional_tokens())
    if kind == "e_adapter":  # both branches and the FaceID LoRA
        identity = F.normalize(torch.randn(1, 512, generator=generator), dim=-1)
        return comfy.pack.nodes.e_adapter_nodes.apply_e_adapter(model, e_adapter(family, folder), identity,
                                                                torch.randn(1, 1024, generator=generator))
    if kind == "facecrafter":
        crafter = random_facecrafter()
        with torch.no_grad():
            lmk = crafter.landmark_tokens(landmark_images().permute(0, 3, 1, 2))
            emo = crafter.emotion_tokens(torch.rand(1, 10, generator=generator))
        return host.facecrafter.apply_facecrafter(model, crafter, lmk, emo)
    assert kind == "reference"
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    latent, id_context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 7, CONTEXT_DIM, generator=generator)
    patched, _ = host.reference.apply_reference_adapter(model, lora, latent, id_context, 0.8)
    return patched


def assert_agrees_with_float32(half_patched, half_plain, full_patched, full_plain, dtype):
    assert half_patched.dtype == dtype and torch.isfinite(half_patched).all()
    effect = (full_patched - full_plain).abs().max()
    assert effect > 1e-2  # the patch does something
    rounding = (half_plain.float() - full_plain).abs().max()  # what the half type alone does to the plain UNet
    error = (half_patched.float() - full_patched).abs().max()
    assert error <= 2 * rounding + 0.05 * effect, (float(error), float(rounding), float(effect))


CASES = [("SD1.5", kind) for kind in ("expression", "e_adapter", "facecrafter", "reference")]
CASES += [("SDXL", kind) for kind in ("expression", "e_adapter")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("family", "kind"), CASES, ids=["-".join(case) for case in CASES])
def test_each_patch_computes_in_the_models_half_type(comfy, tmp_path_factory, family, kind, dtype):
    hosts = Hosts(family)
    folder = tmp_path_factory.getbasetemp()
    half = half_model(family, dtype)
    half_patched, full_patched = patch(comfy, kind, half, family, folder), patch(comfy, kind, hosts.model, family, folder)
    for order in ROW_ORDERS:
        assert_agrees_with_float32(hosts.comfy(half_patched, cond_or_uncond=order), hosts.comfy(half, cond_or_uncond=order),
                                   hosts.comfy(full_patched, cond_or_uncond=order), hosts.comfy(cond_or_uncond=order), dtype)


def guided_sample(comfy, model, facecrafter: bool = True):
    """Two euler steps under the FaceCrafter Guider (w 2.5/2.0/2.0), or plain CFG 2.5 with ``facecrafter=False``."""
    import comfy.samplers as samplers

    generator = torch.Generator().manual_seed(5)
    positive, negative = [[torch.randn(1, 7, CONTEXT_DIM, generator=generator), {}]], [[torch.zeros(1, 7, CONTEXT_DIM), {}]]
    if facecrafter:
        [guider] = comfy.pack.nodes.facecrafter_nodes.FaceCrafterGuider.execute(model, positive, negative, 2.5, 2.0, 2.0).result
    else:
        guider = samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(2.5)
    sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    return guider.sample(noise, torch.zeros_like(noise), samplers.sampler_object("euler"), sigmas, seed=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_facecrafter_guider_samples_in_the_models_half_type(comfy, tmp_path_factory, dtype):
    """FaceCrafter and the Expression Adapter stacked, sampled by the guider (three positives and the negative)."""
    folder = tmp_path_factory.getbasetemp()

    def stacked(model):
        return patch(comfy, "expression", patch(comfy, "facecrafter", model, "SD1.5", folder), "SD1.5", folder)

    full, half = Hosts("SD1.5").model, half_model("SD1.5", dtype)
    full_guided, half_guided = guided_sample(comfy, stacked(full)), guided_sample(comfy, stacked(half))
    full_plain, half_plain = guided_sample(comfy, full, facecrafter=False), guided_sample(comfy, half, facecrafter=False)
    assert torch.isfinite(half_guided).all()
    effect = (full_guided - full_plain).abs().max()
    assert effect > 1e-2
    rounding = (half_plain - full_plain).abs().max()
    assert (half_guided - full_guided).abs().max() <= 2 * rounding + 0.05 * effect
