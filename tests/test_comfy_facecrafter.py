"""FaceCrafter inside ComfyUI's own UNet: both hosts agree, switches per chunk, the guider (paper Eq. 6), nodes.

Needs a real ComfyUI (skipped where none is found). Stand-in models: the tiny SD1.5 UNet of
``tiny_unets`` and a random tiny FaceCrafter.
"""

from __future__ import annotations

import logging

import pytest
import torch

from adapters.facecrafter import GUIDANCE_SWITCHES
from hosts.diffusers import attach_adapters, facecrafter_kwargs
from support.tiny_facecrafter import landmark_images, random_facecrafter
from support.tiny_unets import CONTEXT_DIM, random_expression_adapter, random_reference_lora_state
from support.two_hosts import Hosts

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
# Sampled latents reach ~10 in size; batching four chunks or running them one by one changes float32
# rounding (different matmul blocking) by up to ~1e-4 of that.
SAMPLED = {"atol": 1e-3, "rtol": 1e-3}


def tokens_of(crafter, images=None, emotion=None):
    with torch.no_grad():
        lmk = None if images is None else crafter.landmark_tokens(images.permute(0, 3, 1, 2))
        emo = None if emotion is None else crafter.emotion_tokens(emotion)
    return lmk, emo


def apply(comfy, model, crafter, lmk, emo, **options):
    return comfy.pack.hosts.comfyui.facecrafter.apply_facecrafter(model, crafter, lmk, emo, **options)


def diffusers_rows(hosts, crafter, lmk, emo, alpha_lmk, alpha_emo, extra=None):
    """The diffusers host with per-row alphas; ``extra``: more named adapters with tokens."""
    adapters = {"lmk": crafter.lmk, "emo": crafter.emo} | {name: a for name, (a, _) in (extra or {}).items()}
    attach_adapters(hosts.unet, adapters)
    kwargs = facecrafter_kwargs(crafter, lmk.expand(hosts.batch, -1, -1), emo.expand(hosts.batch, -1, -1),
                              torch.tensor(alpha_lmk), torch.tensor(alpha_emo))
    for name, (_, tokens) in (extra or {}).items():
        kwargs["adapter_tokens"][name] = tokens
    with torch.no_grad():
        return hosts.unet(hosts.x, hosts.t, encoder_hidden_states=hosts.context, cross_attention_kwargs=kwargs).sample


@pytest.mark.parametrize("order", [[1, 0], [0, 1], [0]], ids=["uncond_first", "cond_first", "cfg_1"])
def test_hosts_agree_with_branches_on_the_conditional_rows_only(comfy, order):
    hosts = Hosts("SD1.5", batch=len(order))
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10))
    patched = apply(comfy, hosts.model, crafter, lmk, emo, lmk_strength=0.7, emo_strength=1.3)
    on = [1.0 if kind == 0 else 0.0 for kind in order]
    expected = diffusers_rows(hosts, crafter, lmk, emo, [0.7 * a for a in on], [1.3 * a for a in on])
    got = hosts.comfy(patched, cond_or_uncond=order)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - hosts.comfy(cond_or_uncond=order)).abs().max() > 1e-2


def test_rows_with_alpha_zero_equal_the_base_model_bit_for_bit(comfy):
    hosts = Hosts("SD1.5", batch=2)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10))
    patched = apply(comfy, hosts.model, crafter, lmk, emo)
    mixed, base = hosts.comfy(patched, cond_or_uncond=[1, 0]), hosts.comfy(cond_or_uncond=[1, 0])
    assert torch.equal(mixed[0], base[0]) and (mixed[1] - base[1]).abs().max() > 1e-2
    off = apply(comfy, hosts.model, crafter, lmk, emo, lmk_strength=0.0, emo_strength=0.0)
    assert torch.equal(hosts.comfy(off, cond_or_uncond=[1, 0]), base)


def test_guider_switches_follow_the_chunk_index_in_any_order(comfy):
    hosts = Hosts("SD1.5", batch=4)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10))
    patched = apply(comfy, hosts.model, crafter, lmk, emo)
    patched.model_options["transformer_options"]["facecrafter_switches"] = GUIDANCE_SWITCHES
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        alpha_lmk = [GUIDANCE_SWITCHES[i][0] for i in order]
        alpha_emo = [GUIDANCE_SWITCHES[i][1] for i in order]
        expected = diffusers_rows(hosts, crafter, lmk, emo, alpha_lmk, alpha_emo)
        torch.testing.assert_close(hosts.comfy(patched, cond_or_uncond=order), expected, atol=1e-4, rtol=1e-4)


def test_keys_values_are_projected_once_per_run_not_per_step(comfy):
    hosts = Hosts("SD1.5", batch=1)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10))
    patched = apply(comfy, hosts.model, crafter, lmk, emo)
    [application] = comfy.pack.hosts.comfyui.facecrafter.facecrafter_applications(patched)
    sample(comfy, patched, cfg_guider(patched, cfg=2.0), steps=3)
    assert application.projections == 2 * 16  # two modules x 16 layers, for 3 steps x 2 rows
    assert not application._cache  # emptied after the run
    sample(comfy, patched, cfg_guider(patched, cfg=2.0), steps=2)
    assert application.projections == 4 * 16


# -- the guider -----------------------------------------------------------------------------------

POSITIVE = torch.randn(1, 7, CONTEXT_DIM, generator=torch.Generator().manual_seed(21))
NEGATIVE = torch.randn(1, 7, CONTEXT_DIM, generator=torch.Generator().manual_seed(22))


def sample(comfy, model, guider, steps=2, seed=0):
    import comfy.samplers as samplers

    sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return guider.sample(noise, torch.zeros_like(noise), samplers.sampler_object("euler"), sigmas, seed=seed)


def cfg_guider(model, cfg):
    import comfy.samplers as samplers

    guider = samplers.CFGGuider(model)
    guider.set_conds([[POSITIVE, {}]], [[NEGATIVE, {}]])
    guider.set_cfg(cfg)
    return guider


def facecrafter_guider(comfy, model, w_id=2.5, w_lmk=2.0, w_emo=2.0, guider_class=None):
    node = comfy.pack.nodes.facecrafter_nodes
    if guider_class is None:
        [guider] = node.FaceCrafterGuider.execute(model, [[POSITIVE, {}]], [[NEGATIVE, {}]], w_id, w_lmk, w_emo).result
        return guider
    guider = guider_class(model)
    guider.set_conds([[POSITIVE, {}]], [[NEGATIVE, {}]])
    guider.set_weights(w_id, w_lmk, w_emo)
    return guider


def separate_predictions(model, positive, negative, x, timestep, model_options, negative_index=1):
    """Eq. 6's four predictions from four separate model calls, each a plain CFG chunk: the negative as CFG's
    unconditional chunk (index 1: stacked adapters give it their unconditional input, FaceCrafter's branches off),
    each positive as CFG's conditional chunk (index 0: stacked adapters on) told its FaceCrafter switches.
    ``negative_index=0``: the negative read as conditional, the mistake stacked adapters made before."""
    import comfy.samplers as samplers

    def one_call(cond, index, switches):
        options = dict(model_options)
        options["transformer_options"] = dict(model_options["transformer_options"]) | {
            "facecrafter_switches": {index: switches}}
        conds = [None] * index + [cond]
        return samplers.calc_cond_batch(model, conds, x, timestep, options)[index]

    uncond = one_call(negative, negative_index, GUIDANCE_SWITCHES[0])
    return [uncond] + [one_call(positive, 0, GUIDANCE_SWITCHES[i]) for i in (1, 2, 3)]


def equation_6(w_id, w_lmk, w_emo, e0, e_id, e_lmk, e_emo):
    return e0 + w_id * (e_id - e0) + w_lmk * (e_lmk - e_id) + w_emo * (e_emo - e_id)


def separate_calls_guider(comfy, negative_index=1, after=lambda x, guided: guided):
    """Eq. 6 by hand from four separate model calls; ``after(x, guided)``: a post-CFG step written out by hand."""

    class SeparateCalls(comfy.pack.nodes.facecrafter_nodes.FaceCrafterCFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            eps = separate_predictions(self.inner_model, self.conds["positive"], self.conds["negative"], x, timestep,
                                       model_options, negative_index)
            return after(x, equation_6(self.w_id, self.w_lmk, self.w_emo, *eps))

    return SeparateCalls


def reordering(model, permutation, calls):
    """A clone of ``model`` whose UNet calls run their chunks permuted (ComfyUI does not fix the order)."""
    def wrapper(apply_model, args):
        x, t, c, indices = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        calls.append(list(indices))
        chunks, size = len(indices), x.shape[0] // len(indices)
        positions = [p for p in permutation if p < chunks]
        rows = torch.cat([torch.arange(p * size, (p + 1) * size) for p in positions])
        options = dict(c["transformer_options"]) | {"cond_or_uncond": [indices[p] for p in positions]}
        out = apply_model(x[rows], t[rows], **(c | {"c_crossattn": c["c_crossattn"][rows], "transformer_options": options}))
        return out[torch.argsort(rows)]

    reordered = model.clone()
    reordered.set_model_unet_function_wrapper(wrapper)
    return reordered


@pytest.fixture
def patched(comfy):
    hosts = Hosts("SD1.5", batch=1)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10))
    return hosts, apply(comfy, hosts.model, crafter, lmk, emo), crafter, lmk


def test_guided_output_equals_the_formula_from_four_separate_calls(comfy, patched):
    hosts, model, _, _ = patched
    guided = sample(comfy, model, facecrafter_guider(comfy, model))
    by_hand = sample(comfy, model, facecrafter_guider(comfy, model, guider_class=separate_calls_guider(comfy)))
    torch.testing.assert_close(guided, by_hand, **SAMPLED)
    plain_cfg = sample(comfy, model, cfg_guider(model, 2.5))
    assert (guided - plain_cfg).abs().max() > 0.05


def test_without_control_weights_it_is_plain_cfg_on_the_identity(comfy, patched):
    hosts, model, _, _ = patched
    guided = sample(comfy, model, facecrafter_guider(comfy, model, w_id=3.0, w_lmk=0.0, w_emo=0.0))
    torch.testing.assert_close(guided, sample(comfy, hosts.model, cfg_guider(hosts.model, 3.0)), **SAMPLED)


def test_one_module_with_equal_weights_is_plain_cfg_on_id_plus_lmk(comfy, patched):
    hosts, _, crafter, lmk = patched
    lmk_only = apply(comfy, hosts.model, crafter, lmk, None)
    guided = sample(comfy, lmk_only, facecrafter_guider(comfy, lmk_only, w_id=2.0, w_lmk=2.0, w_emo=2.0))
    # a plain sampler turns the branch on for the positive and off for the negative: CFG on ID + LMK
    torch.testing.assert_close(guided, sample(comfy, lmk_only, cfg_guider(lmk_only, 2.0)), **SAMPLED)


PERMUTATIONS = ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1])


def test_guider_result_does_not_depend_on_how_comfyui_orders_the_chunks(comfy, patched):
    _, model, _, _ = patched
    calls = []
    results = [sample(comfy, reordered, facecrafter_guider(comfy, reordered), steps=2)
               for reordered in (reordering(model, permutation, calls) for permutation in PERMUTATIONS)]
    assert len(calls) == 3 * 2 and all(sorted(c) == [0, 1, 2, 3] for c in calls)  # one call of 4 chunks per step
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], **SAMPLED)


def test_guider_on_a_model_without_facecrafter_is_refused(comfy):
    hosts = Hosts("SD1.5", batch=1)
    with pytest.raises(ValueError, match="FaceCrafter Guider needs a model patched by Apply FaceCrafter"):
        facecrafter_guider(comfy, hosts.model)
    with pytest.raises(ValueError, match="FaceCrafter Guider: w_id must be a finite number between 0 and 20; got nan"):
        comfy.pack.nodes.facecrafter_nodes.FaceCrafterGuider.execute(hosts.model, [], [], float("nan"), 2.0, 2.0)


# -- composition ----------------------------------------------------------------------------------

def test_stacks_with_the_expression_adapter(comfy):
    hosts = Hosts("SD1.5", batch=2)
    crafter, adapter = random_facecrafter(), random_expression_adapter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10))
    expression = torch.randn(1, 55)
    with torch.no_grad():
        cond, uncond = adapter.expression_tokens(expression), adapter.unconditional_tokens()
    with_expression = comfy.pack.hosts.comfyui.cross_attention.apply_cross_attention_branch(hosts.model, adapter, cond, uncond)
    both = apply(comfy, with_expression, crafter, lmk, emo)
    expected = diffusers_rows(hosts, crafter, lmk, emo, [0.0, 1.0], [0.0, 1.0],
                              extra={"expression": (adapter, torch.cat([uncond, cond]))})
    torch.testing.assert_close(hosts.comfy(both, cond_or_uncond=[1, 0]), expected, atol=1e-4, rtol=1e-4)


def test_the_reference_adapter_goes_on_top(comfy):
    hosts = Hosts("SD1.5", batch=2)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10))
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    apply_reference = comfy.pack.hosts.comfyui.reference.apply_reference_adapter
    latent, id_context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, CONTEXT_DIM)
    on_top, _ = apply_reference(apply(comfy, hosts.model, crafter, lmk, emo), lora, latent, id_context, 0.8)
    underneath, _ = apply_reference(hosts.model, lora, latent, id_context, 0.8)
    underneath = apply(comfy, underneath, crafter, lmk, emo)
    reference_only, _ = apply_reference(hosts.model, lora, latent, id_context, 0.8)
    one = hosts.comfy(on_top, cond_or_uncond=[1, 0])
    torch.testing.assert_close(one, hosts.comfy(underneath, cond_or_uncond=[1, 0]), atol=1e-6, rtol=1e-6)
    assert (one - hosts.comfy(reference_only, cond_or_uncond=[1, 0])).abs().max() > 1e-3  # both act


def stacked_model(comfy, kind, hosts, crafter, lmk, emo):
    """FaceCrafter with the Expression Adapter underneath, or the Reference Adapter on top (as the README stacks them)."""
    generator = torch.Generator().manual_seed(31)
    if kind == "expression":
        adapter = random_expression_adapter()
        with torch.no_grad():
            cond, uncond = adapter.expression_tokens(torch.randn(1, 55, generator=generator)), adapter.unconditional_tokens()
        underneath = comfy.pack.hosts.comfyui.cross_attention.apply_cross_attention_branch(hosts.model, adapter, cond, uncond)
        return apply(comfy, underneath, crafter, lmk, emo)
    lora = comfy.pack.adapters.lora.ReferenceLora.from_state_dict(random_reference_lora_state())
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    on_top, _ = comfy.pack.hosts.comfyui.reference.apply_reference_adapter(apply(comfy, hosts.model, crafter, lmk, emo),
                                                                        lora, latent, POSITIVE, 0.8)
    return on_top


@pytest.mark.parametrize("kind", ["expression", "reference"])
def test_stacked_adapters_act_on_the_guiders_three_positives_and_not_its_negative(comfy, kind):
    hosts = Hosts("SD1.5", batch=1)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10, generator=torch.Generator().manual_seed(3)))
    stacked = stacked_model(comfy, kind, hosts, crafter, lmk, emo)
    guided = sample(comfy, stacked, facecrafter_guider(comfy, stacked))
    by_hand = sample(comfy, stacked, facecrafter_guider(comfy, stacked, guider_class=separate_calls_guider(comfy)))
    torch.testing.assert_close(guided, by_hand, **SAMPLED)
    # the test tells the old mistake apart (the negative read as conditional), and the stacked adapter acts
    mistaken = sample(comfy, stacked, facecrafter_guider(comfy, stacked, guider_class=separate_calls_guider(comfy, 0)))
    assert (guided - mistaken).abs().max() > 1e-2
    facecrafter_only = apply(comfy, hosts.model, crafter, lmk, emo)
    assert (guided - sample(comfy, facecrafter_only, facecrafter_guider(comfy, facecrafter_only))).abs().max() > 1e-2
    calls = []
    for permutation in PERMUTATIONS[1:]:
        reordered = reordering(stacked, permutation, calls)
        torch.testing.assert_close(sample(comfy, reordered, facecrafter_guider(comfy, reordered)), guided, **SAMPLED)
    assert len(calls) == 2 * 2 and all(sorted(c) == [0, 1, 2, 3] for c in calls)  # 4 chunks in one call per step


# -- post-CFG hooks ---------------------------------------------------------------------------------

def test_post_cfg_hooks_get_the_guided_result_and_comfyuis_arguments(comfy):
    import comfy.samplers as samplers

    hosts = Hosts("SD1.5", batch=1)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(), torch.rand(1, 10, generator=torch.Generator().manual_seed(4)))
    stacked = stacked_model(comfy, "expression", hosts, crafter, lmk, emo)
    seen = []

    def hook(args):
        x, sigma, options = args["input"], args["sigma"], args["model_options"]
        e0, e_id, e_lmk, e_emo = separate_predictions(args["model"], args["cond"], args["uncond"], x, sigma, options)
        torch.testing.assert_close(args["denoised"], equation_6(2.5, 2.0, 2.0, e0, e_id, e_lmk, e_emo), **SAMPLED)
        for name, expected in (("uncond_denoised", e0), ("cond_denoised", e_id), ("lmk_denoised", e_lmk),
                               ("emo_denoised", e_emo)):
            torch.testing.assert_close(args[name], expected, **SAMPLED)
        assert (args["cond_scale"], args["lmk_scale"], args["emo_scale"]) == (2.5, 2.0, 2.0)
        # a hook that runs the model again on its cond (PAG, SAG do) gets the ID prediction it was given
        [again] = samplers.calc_cond_batch(args["model"], [args["cond"]], x, sigma, options)
        torch.testing.assert_close(again, args["cond_denoised"], **SAMPLED)
        seen.append(float(sigma.max()))
        return args["denoised"] * 0.5  # used: halves what the sampler steps to

    hooked = stacked.clone()
    hooked.set_model_sampler_post_cfg_function(hook)
    halved = sample(comfy, hooked, facecrafter_guider(comfy, hooked), steps=2)
    assert len(seen) == 2
    by_hand = separate_calls_guider(comfy, after=lambda x, guided: guided * 0.5)
    torch.testing.assert_close(halved, sample(comfy, stacked, facecrafter_guider(comfy, stacked, guider_class=by_hand)),
                               **SAMPLED)


def test_a_core_post_cfg_node_shapes_the_guided_result(comfy, patched):
    from comfy_extras.nodes_eps import EpsilonScaling

    _, model, _, _ = patched
    [scaled] = EpsilonScaling.execute(model, 1.1).result
    guided = sample(comfy, scaled, facecrafter_guider(comfy, scaled))
    # Epsilon Scaling, by its paper: the guided noise x - denoised divided by the factor
    by_hand = separate_calls_guider(comfy, after=lambda x, denoised: x - (x - denoised) / 1.1)
    torch.testing.assert_close(guided, sample(comfy, scaled, facecrafter_guider(comfy, scaled, guider_class=by_hand)),
                               **SAMPLED)
    assert (guided - sample(comfy, model, facecrafter_guider(comfy, model))).abs().max() > 1e-2


def test_cfg_functions_that_do_not_fit_four_predictions_are_named(comfy, patched, caplog):
    from comfy_extras.nodes_model_advanced import RescaleCFG

    _, model, _, _ = patched
    [rescaled] = RescaleCFG().patch(model, 0.7)
    with caplog.at_level(logging.WARNING):
        facecrafter_guider(comfy, rescaled)
    assert "the model has sampler_cfg_function (from a node such as RescaleCFG" in caplog.text


# -- nodes and bad inputs -------------------------------------------------------------------------

def run_apply(comfy, model, crafter, **inputs):
    node = comfy.pack.nodes.facecrafter_nodes.ApplyFaceCrafter
    defaults = {"lmk_strength": 1.0, "emo_strength": 1.0, "start_at": 0.0, "end_at": 1.0}
    [out] = node.execute(model, crafter, **(defaults | inputs)).result
    return out


def test_apply_node_batches_per_image_and_matches_the_library(comfy):
    hosts = Hosts("SD1.5", batch=4)
    crafter = random_facecrafter()
    images, emotion = landmark_images(batch=2), torch.rand(2, 10)
    node_model = run_apply(comfy, hosts.model, crafter, landmark_image=images,
                           emotion=comfy.pack.encoders.expressions.Emotion(emotion))
    library_model = apply(comfy, hosts.model, crafter, *tokens_of(crafter, images, emotion))
    assert torch.equal(hosts.comfy(node_model, cond_or_uncond=[1, 0]), hosts.comfy(library_model, cond_or_uncond=[1, 0]))
    three = Hosts("SD1.5", batch=3)
    with pytest.raises(ValueError, match="the landmark image has 2 rows but the batch has 3 images"):
        three.comfy(run_apply(comfy, three.model, crafter, landmark_image=images))


def test_per_frame_rows_follow_comfyuis_context_window(comfy):
    """Under context windows a chunk holds the window's frames: they get those frames' landmark images and emotions."""
    from types import SimpleNamespace

    hosts = Hosts("SD1.5", batch=2)
    crafter = random_facecrafter()
    lmk, emo = tokens_of(crafter, landmark_images(batch=4), torch.rand(4, 10))
    whole_batch = apply(comfy, hosts.model, crafter, lmk, emo)
    frames_2_and_3 = apply(comfy, hosts.model, crafter, lmk[2:], emo[2:])
    window = SimpleNamespace(index_list=[2, 3])  # what ComfyUI's context-window handler puts in transformer_options
    torch.testing.assert_close(hosts.comfy(whole_batch, cond_or_uncond=[0], context_window=window),
                               hosts.comfy(frames_2_and_3, cond_or_uncond=[0]), atol=0, rtol=0)
    assert not torch.equal(hosts.comfy(frames_2_and_3, cond_or_uncond=[0]), hosts.comfy(apply(
        comfy, hosts.model, crafter, lmk[:2], emo[:2]), cond_or_uncond=[0]))  # the frames differ, so the test can fail


def test_landmark_images_of_another_size_are_resized_with_a_note(comfy, caplog):
    hosts = Hosts("SD1.5", batch=1)
    crafter = random_facecrafter()
    with caplog.at_level(logging.WARNING):
        resized = run_apply(comfy, hosts.model, crafter, landmark_image=landmark_images(size=96))
    assert "landmark images of 96x96 resized to 64x64" in caplog.text
    assert (hosts.comfy(resized) - hosts.comfy()).abs().max() > 1e-3


def test_blank_landmark_images_are_refused_unless_asked_for(comfy):
    hosts = Hosts("SD1.5", batch=1)
    crafter = random_facecrafter()
    blank = torch.cat([landmark_images(), torch.zeros(1, 64, 64, 3)])
    with pytest.raises(ValueError, match=r"landmark image 2 is all black \(no face drawn\)"):
        run_apply(comfy, hosts.model, crafter, landmark_image=blank)
    run_apply(comfy, hosts.model, crafter, landmark_image=blank, allow_blank_landmark_image=True)


@pytest.mark.parametrize("emotion, message", [
    (torch.zeros(1, 7), r"shape \(batch, 10\)"),
    (torch.full((1, 10), float("nan")), "emotion rows 1 have NaN"),
])
def test_bad_emotions_are_refused_by_the_node(comfy, emotion, message):
    with pytest.raises(ValueError, match=message):
        run_apply(comfy, Hosts("SD1.5", batch=1).model, random_facecrafter(), emotion=emotion)


def test_missing_inputs_and_modules_are_named(comfy):
    model = Hosts("SD1.5", batch=1).model
    with pytest.raises(ValueError, match="needs a landmark image, an emotion or both"):
        run_apply(comfy, model, random_facecrafter())
    with pytest.raises(ValueError, match="has no EMO \\(emotion\\) module"):
        run_apply(comfy, model, random_facecrafter(emo=False), emotion=torch.rand(1, 10))
    with pytest.raises(ValueError, match="Apply FaceCrafter: lmk_strength must be a finite number between 0 and 3; got inf"):
        run_apply(comfy, model, random_facecrafter(), emotion=torch.rand(1, 10), lmk_strength=float("inf"))


def test_an_sdxl_model_is_refused(comfy):
    hosts = Hosts("SDXL", batch=1)
    with pytest.raises(ValueError, match=r"FaceCrafter is built on Arc2Face \(SD1.5\) and cannot patch this model.*SDXL"):
        run_apply(comfy, hosts.model, random_facecrafter(), emotion=torch.rand(1, 10))


def test_load_node_reads_the_file_from_the_models_folder(comfy, tmp_path):
    import folder_paths

    crafter = random_facecrafter(lmk=False)
    folder = tmp_path / "expression_adapters"
    folder.mkdir()
    crafter.save(folder / "facecrafter_emo.safetensors")
    folder_paths.add_model_folder_path("expression_adapters", str(folder))
    [loaded] = comfy.pack.nodes.facecrafter_nodes.LoadFaceCrafter.execute("facecrafter_emo.safetensors").result
    assert loaded.lmk is None and torch.equal(loaded.emo.kv["1"].to_v_ip.weight, crafter.emo.kv["1"].to_v_ip.weight)


def test_pose_editor_node_sweeps_and_reports(comfy):
    node = comfy.pack.nodes.facecrafter_nodes.LandmarkPoseEditor
    landmarks = comfy.pack.encoders.expressions.Landmarks(torch.rand(1, 478, 3) * 0.2 + 0.4, image_size=(64, 64))
    angles = {"yaw": -20.0, "pitch": 0.0, "roll": 0.0, "scale": 1.0, "shift_x": 0.0, "shift_y": 0.0}
    posed, report = node.execute(landmarks, **angles, frames=3, yaw_end=20.0, pitch_end=0.0, roll_end=0.0).result
    assert posed.values.shape == (3, 478, 3) and report == "all points inside the frame"
    torch.testing.assert_close(posed.values[1], landmarks.values[0], atol=1e-6, rtol=0)
    _, report = node.execute(landmarks, **(angles | {"shift_x": 0.9}), frames=1, yaw_end=0.0, pitch_end=0.0, roll_end=0.0).result
    assert report.startswith("image 1: ") and "outside the frame" in report
    for name in ("yaw_end", "pitch_end", "roll_end"):  # NaN is named as the input it came in, not as its start angle
        ends = {"yaw_end": 0.0, "pitch_end": 0.0, "roll_end": 0.0} | {name: float("nan")}
        with pytest.raises(ValueError, match=rf"Landmark Pose Editor: {name} must be a finite number"):
            node.execute(landmarks, **angles, frames=3, **ends)
