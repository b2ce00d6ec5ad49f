"""The Expression Adapter inside ComfyUI's own UNets, checked against the diffusers host.

Needs a real ComfyUI (skipped where none is found). The tiny UNets carry the same weights in
both hosts, converted with ComfyUI's own diffusers->ComfyUI key mapping.
"""

from __future__ import annotations

import pytest
import torch

from adapters.layers import SD15, SDXL, cross_attention_layers
from support.tiny_unets import random_expression_adapter
from support.two_hosts import Hosts

pytestmark = pytest.mark.comfyui
LAYOUTS = {"SD1.5": SD15, "SDXL": SDXL}


def apply(comfy, model, adapter, expression, strength=1.0, start_at=0.0, end_at=1.0):
    patch = comfy.pack.hosts.comfyui.cross_attention
    with torch.no_grad():
        return patch.apply_cross_attention_branch(model, adapter, adapter.expression_tokens(expression),
                                                  adapter.unconditional_tokens(), strength, start_at, end_at)


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
def test_hosts_agree_and_every_cross_attention_layer_is_patched(comfy, family):
    hosts = Hosts(family, batch=2)
    adapter = random_expression_adapter(family)
    expression = torch.randn(2, 55)  # one expression per image
    patched = apply(comfy, hosts.model, adapter, expression)

    registered = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    model_keys = comfy.pack.hosts.comfyui.cross_attention.cross_attention_widths(hosts.model.model.diffusion_model)
    replaced = {key: comfy.pack.hosts.comfyui.stacking.replace_below(registered, key) for key in model_keys}  # what ComfyUI calls for each layer
    assert set(model_keys) == {layer.comfy_key for layer in cross_attention_layers(LAYOUTS[family])}
    assert all(patch.key == key and patch.cache.conditions["expression"].adapter is adapter for key, patch in replaced.items())
    # SD1.5's blocks hold one transformer each: the patch sits under the block's key, where IPAdapter_plus looks
    # (test_other_packs); SDXL's hold 2 or 10, each under its own key
    assert set(registered) == ({key[:2] for key in model_keys} if family == "SD1.5" else set(model_keys))
    assert len(replaced) == {"SD1.5": 16, "SDXL": 70}[family] and ("middle", 0, 0) in replaced

    plain_comfy, plain_diffusers = hosts.comfy(), hosts.diffusers()
    torch.testing.assert_close(plain_comfy, plain_diffusers, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        tokens = adapter.expression_tokens(expression)
    with_branch_comfy = hosts.comfy(patched)
    with_branch_diffusers = hosts.diffusers(adapter, tokens)
    assert (with_branch_comfy - plain_comfy).abs().max() > 1e-2  # the branch does something
    torch.testing.assert_close(with_branch_comfy, with_branch_diffusers, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", [[1, 0], [0, 1], [0]], ids=["uncond_first", "cond_first", "cfg_1"])
def test_rows_follow_cond_or_uncond(comfy, order):
    hosts = Hosts("SD1.5", batch=2 * len(order))
    adapter = random_expression_adapter()
    expression = torch.randn(2, 55)  # two images per chunk, one expression each
    patched = apply(comfy, hosts.model, adapter, expression)
    with torch.no_grad():
        cond, uncond = adapter.expression_tokens(expression), adapter.unconditional_tokens().expand(2, -1, -1)
    tokens = torch.cat([cond if kind == 0 else uncond for kind in order])
    torch.testing.assert_close(hosts.comfy(patched, cond_or_uncond=order), hosts.diffusers(adapter, tokens), atol=1e-4, rtol=1e-4)


def test_strength_zero_is_exactly_the_unpatched_model(comfy):
    hosts = Hosts("SD1.5", batch=2)
    patched = apply(comfy, hosts.model, random_expression_adapter(), torch.randn(1, 55), strength=0.0)
    assert torch.equal(hosts.comfy(patched, cond_or_uncond=[1, 0]), hosts.comfy(cond_or_uncond=[1, 0]))


def test_strength_scales_the_branch(comfy):
    hosts = Hosts("SD1.5", batch=1)
    adapter = random_expression_adapter()
    expression = torch.randn(1, 55)
    with torch.no_grad():
        tokens = adapter.expression_tokens(expression)
    torch.testing.assert_close(hosts.comfy(apply(comfy, hosts.model, adapter, expression, strength=0.4)),
                               hosts.diffusers(adapter, tokens, scale=0.4), atol=1e-4, rtol=1e-4)


def test_start_and_end_percent_gate_the_right_steps(comfy):
    from comfy.samplers import calculate_sigmas

    hosts = Hosts("SD1.5", batch=1)
    patched = apply(comfy, hosts.model, random_expression_adapter(), torch.randn(1, 55), start_at=0.3, end_at=0.7)
    sampling = hosts.model.get_model_object("model_sampling")
    sigmas = calculate_sigmas(sampling, "simple", 10)[:-1]
    plain = [hosts.comfy(sigma=s) for s in sigmas]
    active = [i for i, s in enumerate(sigmas) if not torch.equal(hosts.comfy(patched, sigma=s), plain[i])]
    # percent_to_sigma maps sampling progress to sigma; "simple" steps are evenly spaced in progress
    expected = [i for i, s in enumerate(sigmas) if sampling.percent_to_sigma(0.7) <= s <= sampling.percent_to_sigma(0.3)]
    assert active == expected
    assert 0 < len(active) < len(sigmas) and active[0] >= 2 and active[-1] <= 7


def test_a_prior_attn2_replace_still_runs_and_the_adapter_stacks_with_itself(comfy):
    from comfy.ldm.modules.attention import optimized_attention

    hosts = Hosts("SD1.5", batch=1)
    calls = []

    def prior_replace(q, k, v, extra_options):  # stands for IPAdapter / InstantID
        calls.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 1.5

    prior = hosts.model.clone()
    for layer in cross_attention_layers(SD15):
        prior.set_model_attn2_replace(prior_replace, *layer.comfy_key)
    adapter = random_expression_adapter()
    expression = torch.randn(1, 55)
    prior_only = hosts.comfy(prior)
    assert len(calls) == 16
    stacked = apply(comfy, prior, adapter, expression, strength=0.5)
    calls.clear()
    once = hosts.comfy(stacked)
    assert len(calls) == 16 and (once - prior_only).abs().max() > 1e-2
    # stacking the adapter on itself adds the branches: 0.5 + 0.5 equals 1.0 applied once
    twice = hosts.comfy(apply(comfy, stacked, adapter, expression, strength=0.5))
    single_strength_one = hosts.comfy(apply(comfy, prior, adapter, expression, strength=1.0))
    torch.testing.assert_close(twice, single_strength_one, atol=1e-5, rtol=1e-5)


def test_a_clone_copies_the_patch_but_shares_its_tokens_and_weights(comfy):
    """A clone's patch is its own object (another pack's in-place ``.add`` on it must not reach the original),
    while the tokens, the per-run cache and the adapter weights behind it are shared, not copied."""
    hosts = Hosts("SD1.5", batch=1)
    adapter = random_expression_adapter()
    patched = apply(comfy, hosts.model, adapter, torch.randn(1, 55))
    cloned = patched.clone()
    original = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)]
    copy = cloned.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)]
    assert copy is not original and copy.cache is original.cache and copy.cache.conditions["expression"].adapter is adapter


def test_an_sd15_adapter_on_an_sdxl_model_is_refused(comfy):
    hosts = Hosts("SDXL", batch=1)
    with pytest.raises(ValueError, match=r"made for SD1.5 models, but the model is SDXL \(70 cross-attention layers\)"):
        apply(comfy, hosts.model, random_expression_adapter("SD1.5"), torch.randn(1, 55))


def test_expression_rows_must_match_the_batch(comfy):
    hosts = Hosts("SD1.5", batch=2)
    patched = apply(comfy, hosts.model, random_expression_adapter(), torch.randn(3, 55))
    with pytest.raises(ValueError, match="the expression has 3 rows but the batch has 2 images"):
        hosts.comfy(patched)


def test_flame_expression_node_builds_from_json_and_controls(comfy):
    node = comfy.pack.nodes.expression_adapter_nodes.FlameExpressionNode
    controls = {"jaw_open": 0.3, "eyelid_left": 0.5, "eyelid_right": 0.0, **{f"expression_{i}": 0.0 for i in range(1, 6)}}
    controls["expression_2"] = -1.0
    rows = [[0.1] * 55, [0.2] * 55]
    [expression] = node.execute(json_values=str(rows), **controls).result
    expected = torch.tensor(rows)
    expected[:, 52] += 0.3
    expected[:, 50] += 0.5
    expected[:, 1] -= 1.0
    torch.testing.assert_close(expression.values, expected)
    [neutral] = node.execute(json_values="", **{**controls, "jaw_open": 0.0, "eyelid_left": 0.0, "expression_2": 0.0}).result
    assert torch.equal(neutral.values, torch.zeros(1, 55))
    with pytest.raises(ValueError, match=r"shape \(batch, 55\); got \(1, 52\)"):
        node.execute(json_values=str([0.0] * 52), **controls)
    with pytest.raises(ValueError, match="not valid JSON|NaN"):
        node.execute(json_values="[" + ", ".join(["NaN"] * 55) + "]", **controls)


class CountingSigmas(torch.Tensor):
    """A sigma tensor that counts its conversions to Python numbers (each one a GPU->CPU sync on a GPU)."""

    conversions = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__float__", "__bool__", "__int__", "__index__", "item", "tolist"):
            CountingSigmas.conversions += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_sigma_gate_is_decided_once_per_step_not_per_layer(comfy):
    from comfy.model_management import load_models_gpu

    hosts = Hosts("SD1.5", batch=2)
    adapter = random_expression_adapter()
    patched = apply(comfy, hosts.model, adapter, torch.randn(1, 55), start_at=0.1, end_at=0.9)
    stacked = apply(comfy, patched, adapter, torch.randn(1, 55), start_at=0.2, end_at=0.8)  # two applications
    load_models_gpu([stacked])
    sampling = hosts.model.get_model_object("model_sampling")
    for step, sigma in enumerate([sampling.percent_to_sigma(0.5), sampling.percent_to_sigma(0.15)]):
        options = dict(stacked.model_options["transformer_options"])
        options["cond_or_uncond"] = [1, 0]
        options["sigmas"] = torch.full((2,), float(sigma)).as_subclass(CountingSigmas)
        CountingSigmas.conversions = 0
        with torch.no_grad():
            stacked.model.diffusion_model(hosts.x, timesteps=hosts.t, context=hosts.context, transformer_options=options)
        assert CountingSigmas.conversions <= 2, f"step {step + 1}: {CountingSigmas.conversions} syncs for 32 patched layers"


def test_branch_keys_values_are_freed_after_each_sampling_run(comfy):
    from comfy.sample import sample

    hosts = Hosts("SD1.5", batch=1)
    patched = apply(comfy, hosts.model, random_expression_adapter(), torch.randn(1, 55))
    cache = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].cache
    seen = []
    original_keys_values = cache.keys_values

    def keys_values(*args, **kwargs):
        result = original_keys_values(*args, **kwargs)
        seen.append(len(cache._cache))
        return result

    cache.keys_values = keys_values
    context = torch.randn(1, 7, 32)
    samples = sample(patched, torch.randn(1, 4, 8, 8), 2, 2.0, "euler", "normal", [[context, {}]], [[context * 0, {}]],
                     torch.zeros(1, 4, 8, 8), disable_pbar=True, seed=0)
    assert torch.isfinite(samples).all()
    assert max(seen) == 16  # one entry per layer during the run: projected once, reused at every step
    assert cache.projections == 16  # once per layer for the whole run
    assert not cache._cache and cache.gate.decision is None  # nothing kept (on the GPU) after the run


def test_per_frame_expressions_follow_comfyuis_context_windows(comfy):
    from comfy.sample import sample
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    hosts = Hosts("SD1.5", batch=1)
    adapter = random_expression_adapter()
    expressions = torch.randn(4, 55)  # one per frame, as Expression Interpolate gives
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(4))

    def run(model, frames):
        # 3 steps: ComfyUI 0.3.64's IndexListContextHandler.set_step compares the 4 step sigmas with
        # the batch's timesteps elementwise, which needs as many sigmas as frames
        return sample(model, noise[frames], 3, 2.0, "euler", "normal", [[context, {}]], [[context * 0, {}]],
                      torch.zeros(len(frames), 4, 8, 8), disable_pbar=True, seed=0)

    patched = apply(comfy, hosts.model, adapter, expressions)
    [windowed] = ContextWindowsManualNode.execute(patched, context_length=2, context_overlap=0, context_schedule="batched",
                                                  context_stride=1, closed_loop=False, fuse_method="flat", dim=0).result
    together = run(windowed, [0, 1, 2, 3])
    # windows [0, 1] and [2, 3] without overlap: each must equal the frames sampled on their own
    first = run(apply(comfy, hosts.model, adapter, expressions[:2]), [0, 1])
    second = run(apply(comfy, hosts.model, adapter, expressions[2:]), [2, 3])
    torch.testing.assert_close(together, torch.cat([first, second]), atol=1e-4, rtol=1e-4)
    assert (first[0] - first[1]).abs().max() > 1e-3


def test_chunks_evaluated_in_threads_give_the_serial_result(comfy):
    """Newer ComfyUI can run a guided batch's chunks in threads (several GPUs): they share the per-run key/value
    cache and the sigma gate. Chunks at sigmas inside and outside the gate's range, run from four threads at
    once, give what they give one after another, and each layer's keys/values are projected once per layout."""
    from concurrent.futures import ThreadPoolExecutor

    from comfy import model_management

    hosts = Hosts("SD1.5", batch=1)
    patched = apply(comfy, hosts.model, random_expression_adapter(), torch.randn(1, 55), end_at=0.5)
    model_management.load_models_gpu([patched])
    cache = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].cache
    high, low = float(cache.gate.sigma_end) * 2, float(cache.gate.sigma_end) / 2  # branch on / off

    def chunk(job):
        order, sigma = job
        options = dict(patched.model_options["transformer_options"]) | {
            "cond_or_uncond": list(order), "sigmas": torch.full((1,), sigma)}
        with torch.no_grad():
            return patched.model.diffusion_model(hosts.x, timesteps=hosts.t, context=hosts.context, transformer_options=options)

    jobs = [(order, sigma) for order in ([0], [1]) for sigma in (high, low)] * 4
    serial = [chunk(job) for job in jobs]
    assert not torch.equal(serial[0], serial[1])  # the gate matters
    cache.clear()
    projected = []
    [(name, condition)] = cache.conditions.items()
    original = condition.keys_values
    condition.keys_values = lambda *args: projected.append(args[0].comfy_key) or original(*args)
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(chunk, jobs))
    for got, expected in zip(threaded, serial, strict=True):
        assert torch.equal(got, expected)
    assert len(projected) == len(set(projected)) * 2  # per layer: once for [0], once for [1]
