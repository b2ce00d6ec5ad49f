"""The Reference Adapter in ComfyUI: LoRA via ComfyUI's weight patching, write once, read per row.

Checked against the diffusers host on the same tiny weights. Needs a real ComfyUI.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.lora import ReferenceLora
from hosts.diffusers import ReferenceBank, attach_adapters
from support.tiny_unets import CONTEXT_DIM, random_reference_lora_state
from support.two_hosts import Hosts

pytestmark = pytest.mark.comfyui
SD15_LATENT_SCALE = 0.18215  # what ComfyUI's process_latent_in applies for SD1.5


def make_reference(comfy, hosts: Hosts, strength=0.8, references=1, seed=5):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(references, 4, 8, 8, generator=generator)
    id_context = torch.randn(1, 7, CONTEXT_DIM, generator=generator)
    lora_state = random_reference_lora_state()
    pack_lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(lora_state)
    patched, features = comfy.pack.hosts.comfyui.reference.apply_reference_adapter(hosts.model, pack_lora, latent, id_context, strength)
    return patched, features, latent, id_context, ReferenceLora.from_state_dict(lora_state)


def diffusers_reference(hosts: Hosts, latent, id_context, lora: ReferenceLora, strength, read_rows):
    """The same computation in diffusers: a LoRA-free Reference UNet writes, the LoRA-merged UNet reads."""
    bank = ReferenceBank()
    reference_unet = hosts.unet
    attach_adapters(reference_unet)
    with torch.no_grad():
        reference_unet(latent * SD15_LATENT_SCALE, torch.zeros(latent.shape[0]), encoder_hidden_states=id_context.expand(latent.shape[0], -1, -1),
                       cross_attention_kwargs={"reference": bank.writing()})
    main_unet = copy.deepcopy(hosts.unet)
    with torch.no_grad():
        for module_name, weights in lora.modules.items():
            main_unet.get_submodule(module_name).weight += strength * weights.delta()
    attach_adapters(main_unet)
    return hosts.diffusers(unet=main_unet, reference=bank.reading(torch.tensor(read_rows)))


@pytest.mark.parametrize("order", [[1, 0], [0, 1], [0]], ids=["uncond_first", "cond_first", "cfg_1"])
def test_hosts_agree(comfy, order):
    hosts = Hosts("SD1.5", batch=len(order))
    patched, _, latent, id_context, lora = make_reference(comfy, hosts)
    expected = diffusers_reference(hosts, latent, id_context, lora, 0.8, [kind == 0 for kind in order])
    torch.testing.assert_close(hosts.comfy(patched, cond_or_uncond=order), expected, atol=1e-4, rtol=1e-4)


def test_several_references_one_per_output(comfy):
    hosts = Hosts("SD1.5", batch=4)
    patched, features, latent, id_context, lora = make_reference(comfy, hosts, references=2)
    assert features.num_references == 2
    expected = diffusers_reference(hosts, latent, id_context, lora, 0.8, [False, False, True, True])
    torch.testing.assert_close(hosts.comfy(patched, cond_or_uncond=[1, 0]), expected, atol=1e-4, rtol=1e-4)


def test_unconditional_rows_are_bit_identical_and_conditional_rows_change(comfy):
    hosts = Hosts("SD1.5", batch=2)
    plain = hosts.comfy(cond_or_uncond=[1, 0])
    without_lora, *_ = make_reference(comfy, hosts, strength=0.0)
    read = hosts.comfy(without_lora, cond_or_uncond=[1, 0])
    assert torch.equal(read[0], plain[0])
    assert (read[1] - plain[1]).abs().max() > 1e-3
    # with the LoRA on, unconditional rows are exactly the LoRA-patched model's
    with_lora, _, _, _, lora = make_reference(comfy, hosts, strength=0.8)
    lora_only = hosts.model.clone()
    lora_only.add_patches(comfy.pack.hosts.comfyui.reference.native_lora_patches(lora_only, lora, 0.8), 0.8)
    assert torch.equal(hosts.comfy(with_lora, cond_or_uncond=[1, 0])[0], hosts.comfy(lora_only, cond_or_uncond=[1, 0])[0])


def test_lora_maps_to_native_weights_and_unpatch_restores_them(comfy):
    from comfy.model_management import load_models_gpu

    hosts = Hosts("SD1.5", batch=1)
    patched, *_ = make_reference(comfy, hosts, strength=0.5)
    diffusion_model = hosts.model.model.diffusion_model
    natives = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
               "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": "middle_block.1.transformer_blocks.0.attn1.to_out.0",
               "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v": "output_blocks.11.1.transformer_blocks.0.attn1.to_v"}
    original = {n: diffusion_model.get_submodule(n).weight.detach().clone() for n in natives.values()}
    load_models_gpu([patched])
    published = random_reference_lora_state()  # the file's tensors: rank 4, no alpha, so the delta is up @ down
    for module, native in natives.items():
        delta = published[f"unet.{module}.lora.up.weight"] @ published[f"unet.{module}.lora.down.weight"]
        expected = original[native] + 0.5 * delta
        torch.testing.assert_close(diffusion_model.get_submodule(native).weight, expected, atol=1e-6, rtol=1e-5)
    patched.unpatch_model()
    for native in natives.values():
        assert torch.equal(diffusion_model.get_submodule(native).weight, original[native])


def test_reference_features_are_written_once_per_generation_not_per_step(comfy):
    from comfy.sample import sample

    hosts = Hosts("SD1.5", batch=1)
    patched, features, *_ = make_reference(comfy, hosts)
    recorded = dict(features.features)
    assert features.captures == 1 and len(recorded) == 16
    context = torch.randn(1, 7, CONTEXT_DIM)
    noise = torch.randn(1, 4, 8, 8)
    samples = sample(patched, noise, 4, 2.0, "euler", "normal", [[context, {}]], [[context * 0, {}]],
                                  torch.zeros(1, 4, 8, 8), disable_pbar=True, seed=0)
    assert torch.isfinite(samples).all()
    assert features.captures == 1
    assert not features._cache  # the per-run reference keys/values are freed when sampling ends
    assert all(features.features[key] is tensor for key, tensor in recorded.items())


def test_an_sdxl_model_is_refused(comfy):
    hosts = Hosts("SDXL", batch=1)
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    with pytest.raises(ValueError, match="supports SD1.5-family models"):
        comfy.pack.hosts.comfyui.reference.apply_reference_adapter(hosts.model, lora, torch.zeros(1, 4, 8, 8),
                                                                 torch.zeros(1, 7, CONTEXT_DIM), 0.8)


def test_composes_with_the_expression_adapter_in_either_order(comfy):
    from support.tiny_unets import random_expression_adapter

    hosts = Hosts("SD1.5", batch=2)
    adapter = random_expression_adapter()
    expression = torch.randn(1, 55)
    with torch.no_grad():
        tokens, uncond = adapter.expression_tokens(expression), adapter.unconditional_tokens()
    apply_expression = comfy.pack.hosts.comfyui.cross_attention.apply_cross_attention_branch
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    apply_reference = comfy.pack.hosts.comfyui.reference.apply_reference_adapter
    latent, id_context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, CONTEXT_DIM)

    expression_first, _ = apply_reference(apply_expression(hosts.model, adapter, tokens, uncond), lora, latent, id_context, 0.8)
    reference_first, _ = apply_reference(hosts.model, lora, latent, id_context, 0.8)
    reference_first = apply_expression(reference_first, adapter, tokens, uncond)
    reference_only, _ = apply_reference(hosts.model, lora, latent, id_context, 0.8)
    one = hosts.comfy(expression_first, cond_or_uncond=[1, 0])
    assert torch.equal(one, hosts.comfy(reference_first, cond_or_uncond=[1, 0]))
    assert (one - hosts.comfy(reference_only, cond_or_uncond=[1, 0])).abs().max() > 1e-3  # both act


def test_a_combined_id_conditioning_is_refused_with_a_clear_message(comfy):
    hosts = Hosts("SD1.5", batch=1)
    node = comfy.pack.nodes.reference_nodes.ApplyReferenceAdapter
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    first, second = torch.randn(1, 7, CONTEXT_DIM), torch.randn(1, 7, CONTEXT_DIM)
    with pytest.raises(ValueError, match="id_conditioning has 2 entries"):
        node.execute(hosts.model, lora, None, torch.rand(1, 64, 64, 3), [[first, {}], [second, {}]], 0.8)
    with pytest.raises(ValueError, match="id_conditioning is empty"):
        node.execute(hosts.model, lora, None, torch.rand(1, 64, 64, 3), [], 0.8)


def lifted_for_a_run(comfy, model):
    """``model`` as one sampling run sees it: our OUTER_SAMPLE stacking wrapper has lifted our replaces over later
    ones that overwrote them (here applied to a clone, since the test calls the UNet without a sampler)."""
    run = model.clone()
    comfy.pack.hosts.comfyui.stacking.lift_ours_over_later_replaces(run.model_options)
    return run


@pytest.mark.parametrize("order", [[1, 0], [0, 1], [0]], ids=["uncond_first", "cond_first", "cfg_1"])
def test_an_earlier_attn1_replace_runs_for_every_row_in_either_order(comfy, order):
    from comfy.ldm.modules.attention import optimized_attention

    from adapters.layers import SD15, self_attention_layers

    hosts = Hosts("SD1.5", batch=2 * len(order))
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    apply_reference = comfy.pack.hosts.comfyui.reference.apply_reference_adapter
    latent, id_context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, CONTEXT_DIM)
    calls = []  # (rows, extra key tokens beyond the query's own) per call of the other pack's replace

    def other_pack(model):  # stands for attention couple / another reference method: chains, then scales
        patched = model.clone()
        existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
        for layer in self_attention_layers(SD15):
            previous = existing.get(layer.comfy_key)

            def replace(q, k, v, extra_options, previous=previous):
                calls.append((q.shape[0], k.shape[1] - q.shape[1]))
                out = previous(q, k, v, extra_options) if previous else optimized_attention(q, k, v, extra_options["n_heads"])
                return out * 1.5
            patched.set_model_attn1_replace(replace, *layer.comfy_key)
        return patched

    other_first, _ = apply_reference(other_pack(hosts.model), lora, latent, id_context, 0.8)
    calls.clear()
    out_other_first = hosts.comfy(other_first, cond_or_uncond=order)
    assert sum(rows for rows, _ in calls) == 16 * hosts.batch  # every row, the conditional ones included
    conditional_rows = 2 * order.count(0)
    assert sum(rows for rows, extra in calls if extra > 0) == 16 * conditional_rows  # with the reference appended
    other_first_calls = sorted(calls)
    reference_first, _ = apply_reference(hosts.model, lora, latent, id_context, 0.8)
    # SD1.5's blocks hold one transformer: ours sits under the blocks' keys, the other pack's (which looks at the
    # layers' keys only) goes over it without calling it; a sampling run lifts ours back on top (the stacking wrapper)
    stacked = other_pack(reference_first)
    calls.clear()
    hosts.comfy(stacked, cond_or_uncond=order)
    assert sorted(calls) == [(hosts.batch, 0)] * 16  # without the lift: every row without the reference, ours dropped
    calls.clear()
    out_reference_first = hosts.comfy(lifted_for_a_run(comfy, stacked), cond_or_uncond=order)
    assert sorted(calls) == other_first_calls
    torch.testing.assert_close(out_other_first, out_reference_first, atol=1e-5, rtol=1e-5)
    reference_only = hosts.comfy(reference_first, cond_or_uncond=order)
    assert (out_other_first - reference_only).abs().max() > 1e-3  # the other pack acts on every row
