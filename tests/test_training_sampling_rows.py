"""Training's previews lay their rows out with a ``RowLayout`` (``training.sampling.denoise`` given a stage's
``SamplingInputs``: contexts per prediction, branch conditions): the same latents as the loop previews ran
before, which stacked [uncond, cond] rows by hand and passed the tokens one per row (``adapter_tokens``).

Expected values: that hand-laid loop, written out here (DPM-Solver++, one batched UNet call per step over the
contexts and tokens concatenated by hand, per-row switches as ``adapter_scale`` tensors, CFG or Eq. 6 written
out), with the tokens computed from the stage's own adapter, encoder and negative. Every stage that samples
previews: Expression Adapter, Reference LoRA (its reference read by the conditional rows), E-Adapter on SD1.5
and SDXL (pooled texts and time ids per chunk), FaceCrafter's three stages (Eq. 6 over 3 or 4 chunks). The
branches have random keys/values, so the conditions change the picture (checked against the same loop
without them).
"""

from __future__ import annotations

import pytest
import torch

from support.tiny_unets import random_expression_adapter
from training.config import load_config
from training.models import load_host_models
from training.sampling import denoise
from training.stages import build_stage

pytestmark = [pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]
COUNT, STEPS, GUIDANCE = 2, 2, 3.0
SHAPE = (COUNT, 4, 8, 8)
# float32 on the CPU, one thread: measured 0.0 for every stage (bit for bit; samples of magnitude about 50). The
# tolerance leaves room for kernels that round a chunk's rows (a switched branch computed on its rows alone, the
# unconditional tokens projected once instead of once per row) otherwise than the whole batch's.
CLOSE = {"atol": 1e-5, "rtol": 1e-6}


def stage_for(config_path, tmp_path, *overrides):
    config = load_config(config_path, [f"output_dir={tmp_path}", "logging.progress_bar=false", *overrides],
                         check_paths=False)
    host = load_host_models(config, torch.device("cpu"), torch.float32, need_vae=False)
    return build_stage(config, host, torch.device("cpu"))


def randomise_key_values(module: torch.nn.Module, seed: int = 0) -> None:
    """Random branch keys/values (stand-ins may start as a no-op branch), so the conditions show in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(("to_k_ip.weight", "to_v_ip.weight")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def hand_laid(unet, scheduler_config, contexts, tokens=None, scales=None, guide=None, reference_rows=None, bank=None,
              added=None):
    """The loop as previews ran it before: ``contexts`` (one per prediction, batch order) concatenated by hand,
    ``tokens``/``scales`` already one per row, ``guide`` over the predictions (None: CFG on [uncond, cond])."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * scheduler.init_noise_sigma
    context = torch.cat(contexts)
    chunks = len(contexts)
    kwargs = {}
    if tokens is not None:
        kwargs["adapter_tokens"] = tokens
    if scales is not None:
        kwargs["adapter_scale"] = scales
    if bank is not None:
        kwargs["reference"] = bank.reading(reference_rows)
    if guide is None:
        def guide(unconditional, conditional):
            return unconditional + GUIDANCE * (conditional - unconditional)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * chunks), t)
            prediction = unet(model_input, t, encoder_hidden_states=context, cross_attention_kwargs=kwargs,
                              added_cond_kwargs=added).sample.float()
            latents = scheduler.step(guide(*prediction.chunk(chunks)), t, latents).prev_sample
    return latents


def by_layout(stage, batch):
    inputs = stage.sampling_inputs(stage.module, batch)
    return denoise(stage.host.unet, stage.host.noise_scheduler.config, inputs, SHAPE, STEPS, GUIDANCE,
                   torch.Generator().manual_seed(7))


def assert_same_and_conditioned(got, expected, without_conditions):
    difference = (got - expected).abs().max()
    torch.testing.assert_close(got, expected, **CLOSE)
    # the conditions matter: the same loop without them is another picture
    assert (expected - without_conditions).abs().max() > 1e3 * max(float(difference), 1e-6)


# -- the Expression Adapter and its Reference LoRA -------------------------------------------------------


def expression_batch(seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"id": torch.nn.functional.normalize(torch.randn(COUNT, 16, generator=generator), dim=1),
            "flame": torch.randn(COUNT, 55, generator=generator)}


def expression_rows(stage, batch):
    """The negative and ID contexts and the [uncond, cond] tokens, as the old sampling_inputs made them."""
    adapter = stage.module.adapter
    with torch.no_grad():
        context = stage.host.id_encoder.encode(batch["id"])
        negative = stage.host.id_encoder.encode_negative(1).expand_as(context)
        tokens = adapter.expression_tokens(batch["flame"])
        uncond = adapter.unconditional_tokens().expand_as(tokens)
    return negative, context, {"expression": torch.cat([uncond, tokens])}


def test_expression_adapter_previews_equal_the_hand_laid_rows(tmp_path):
    stage = stage_for("training/configs/smoke.yaml", tmp_path)
    randomise_key_values(stage.module.adapter)
    batch = expression_batch()
    got = by_layout(stage, batch)
    negative, context, tokens = expression_rows(stage, batch)
    unet, config = stage.host.unet, stage.host.noise_scheduler.config
    expected = hand_laid(unet, config, [negative, context], tokens)
    assert_same_and_conditioned(got, expected, hand_laid(unet, config, [negative, context]))


def test_reference_previews_read_the_reference_on_the_conditional_rows_as_by_hand(tmp_path):
    from training.stages.arc2face import capture_reference

    adapter_file = tmp_path / "expression_adapter.safetensors"
    adapter = random_expression_adapter(seed=5)
    randomise_key_values(adapter, seed=1)
    adapter.save(adapter_file)
    stage = stage_for("training/configs/smoke.yaml", tmp_path, "stage=reference_lora",
                      f"reference_lora.expression_adapter={adapter_file}", "reference_lora.rank=4")
    with torch.no_grad():  # the LoRA's up matrices start at zero: random ones, so the LoRA'd self-attention differs
        for pair in stage.module.lora.values():
            pair["up"].weight.copy_(torch.randn(pair["up"].weight.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    generator = torch.Generator().manual_seed(4)
    batch = expression_batch() | {"reference_latent_mean": torch.randn(COUNT, 4, 8, 8, generator=generator),
                                  "reference_latent_std": torch.zeros(COUNT, 4, 8, 8)}  # std 0: no draw
    got = by_layout(stage, batch)
    negative, context, tokens = expression_rows(stage, batch)
    unet, config = stage.host.unet, stage.host.noise_scheduler.config
    reference = (batch["reference_latent_mean"] - stage.host.latent_shift) * stage.host.latent_scale
    bank = capture_reference(unet, reference, context)
    reads = torch.tensor([False] * COUNT + [True] * COUNT)  # [uncond, cond]: the conditional half reads it
    expected = hand_laid(unet, config, [negative, context], tokens, reference_rows=reads, bank=bank)
    assert_same_and_conditioned(got, expected, hand_laid(unet, config, [negative, context], tokens))


# -- EmojiDiff's E-Adapter -------------------------------------------------------------------------------


def e_adapter_batch(seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"faceid": torch.randn(COUNT, 512, generator=generator), "clip_image": torch.randn(COUNT, 1024, generator=generator),
            "meta": [{"caption": "photo of a person"}, {}]}


@pytest.mark.parametrize("config_path", ["training/configs/emojidiff_base_smoke.yaml",
                                         "training/configs/emojidiff_refined_sdxl_smoke.yaml"])
def test_e_adapter_previews_equal_the_hand_laid_rows(config_path, tmp_path):
    stage = stage_for(config_path, tmp_path)
    adapter = stage.module.adapter
    randomise_key_values(adapter)
    batch = e_adapter_batch()
    got = by_layout(stage, batch)
    with torch.no_grad():
        prompts = [meta.get("caption") or stage.cfg["prompt"] for meta in batch["meta"]]
        context, pooled = stage.prompts(prompts)
        negative, negative_pooled = stage.prompts([""] * COUNT)
        id_tokens, exp_tokens = adapter.id_tokens(batch["faceid"]), adapter.expression_tokens(batch["clip_image"])
        tokens = {"id": torch.cat([adapter.unconditional_id_tokens().expand_as(id_tokens), id_tokens]),
                  "expression": torch.cat([adapter.unconditional_expression_tokens().expand_as(exp_tokens), exp_tokens])}
    added = None
    if stage.sdxl:
        size = float(stage.resolution)
        added = {"text_embeds": torch.cat([negative_pooled, pooled]),
                 "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(2 * COUNT, 6)}
    unet, config = stage.host.unet, stage.host.noise_scheduler.config
    expected = hand_laid(unet, config, [negative, context], tokens, added=added)
    assert_same_and_conditioned(got, expected, hand_laid(unet, config, [negative, context], added=added))


# -- FaceCrafter: Eq. 6 over its guider's chunks -------------------------------------------------------------

FACECRAFTER = {"facecrafter_lmk": ("lmk",), "facecrafter_emo": ("emo",), "facecrafter_joint": ("lmk", "emo")}


@pytest.mark.parametrize("name", list(FACECRAFTER))
def test_facecrafter_previews_equal_the_hand_laid_eq_6_rows(name, tmp_path):
    stage = stage_for(f"training/configs/{name}_smoke.yaml", tmp_path, "facecrafter.lmk_init=null",
                      "facecrafter.emo_init=null")
    crafter = stage.module.crafter
    randomise_key_values(crafter)
    generator = torch.Generator().manual_seed(6)
    batch = {"source_id": torch.nn.functional.normalize(torch.randn(COUNT, 16, generator=generator), dim=1),
             "landmark_image": torch.rand(COUNT, 3, 64, 64, generator=generator),
             "emotion": torch.rand(COUNT, 10, generator=generator)}
    got = by_layout(stage, batch)
    modules = FACECRAFTER[name]
    with torch.no_grad():
        context = stage.host.id_encoder.encode(batch["source_id"])
        negative = stage.negative.expand_as(context)
        tokens = {"lmk": crafter.lmk.tokens(batch["landmark_image"]) if "lmk" in modules else None,
                  "emo": crafter.emo.tokens(batch["emotion"]) if "emo" in modules else None}
    # the chunks by hand: uncond (negative, branches off), ID (branches off), then ID+LMK and/or ID+EMO
    switches = [(0.0, 0.0), (0.0, 0.0)] + [(1.0, 0.0)] * ("lmk" in modules) + [(0.0, 1.0)] * ("emo" in modules)
    chunks = len(switches)
    rows = {name: torch.cat([t] * chunks) for name, t in tokens.items() if t is not None}
    scales = {name: torch.tensor([switch[column] for switch in switches for _ in range(COUNT)])
              for column, name in enumerate(("lmk", "emo")) if name in rows}
    weights = [2.0] * len(modules)  # the paper's w_LMK and w_EMO; w_ID 2.5

    def eq_6(unconditional, with_id, *with_modules):
        guided = unconditional + 2.5 * (with_id - unconditional)
        for prediction, weight in zip(with_modules, weights, strict=True):
            guided = guided + weight * (prediction - with_id)
        return guided

    unet, config = stage.host.unet, stage.host.noise_scheduler.config
    contexts = [negative] + [context] * (chunks - 1)
    expected = hand_laid(unet, config, contexts, rows, scales, eq_6)
    assert_same_and_conditioned(got, expected, hand_laid(unet, config, contexts, guide=eq_6))
