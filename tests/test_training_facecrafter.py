"""FaceCrafter's training stages on stand-ins: the tiny SD1.5-shaped UNet and ID encoder of the smoke configs,
small LMK/EMO modules, and a small synthetic prepared set (written with the shard writer, as prepare writes one).

Checks: rows switched off (alpha 0) are the base UNet's output bit for bit in training's forward; the host's
attention record equals a separate recording pass; the trainable parameters follow the K/V formula; each stage
lowers its loss on a fixed batch; a killed run of each stage resumes exactly; the exports load as published.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapters.facecrafter import FaceCrafter
from adapters.layers import SD15, cross_attention_layers
from encoders.arc2face_id import Arc2FaceIDEncoder
from support.training_helpers import resume_after_kill
from training.config import ConfigError, load_config
from training.data import collate
from training.models import load_host_models
from training.prepare import finish
from training.shards import ShardWriter, npy_bytes, shard_name, write_json_atomic
from training.stages import build_stage
from training.tiny import tiny_unet
from training.train import Trainer

pytestmark = [pytest.mark.usefixtures("one_thread")]
CONFIGS = {"facecrafter_lmk": "training/configs/facecrafter_lmk_smoke.yaml",
           "facecrafter_emo": "training/configs/facecrafter_emo_smoke.yaml",
           "facecrafter_joint": "training/configs/facecrafter_joint_smoke.yaml"}
PERSONS, PER_PERSON = 4, 3


def write_shards(folder, seed: int = 0):
    """PERSONS x PER_PERSON stand-in samples, one shard per person. Sample 0 of a person is turned (yaw 20)
    and samples 1, 2 face the camera, all with other expressions: LMK pairs 0-1, 0-2; EMO pair 1-2."""
    rng = np.random.default_rng(seed)
    template = rng.uniform(0.3, 0.7, (478, 3)).astype(np.float32)
    yy, xx = np.mgrid[:16, :16]
    disc = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 30).astype(np.uint8)
    write_json_atomic({"settings": {"stand_in": True}, "shards": []}, folder / "plan.json")
    for person in range(PERSONS):
        writer = ShardWriter(folder / shard_name(person))
        for k in range(PER_PERSON):
            identity = rng.normal(size=16).astype(np.float32)
            emotion = np.concatenate([rng.uniform(-1, 1, 2), rng.dirichlet(np.ones(8))]).astype(np.float32)
            arrays = {"id": identity / np.linalg.norm(identity),
                      "latent_mean": rng.normal(0, 4, (4, 8, 8)).astype(np.float32),
                      "latent_std": np.full((4, 8, 8), 0.01, np.float32),
                      "landmarks": template + rng.normal(0, 0.01, template.shape).astype(np.float32),
                      "blendshapes": rng.uniform(0, 1, 52).astype(np.float32),
                      "head_pose": np.float32([20.0 if k == 0 else 0.0, 0.0, 0.0]),
                      "emotion": emotion, "face_mask": disc}
            files = {f"{name}.npy": npy_bytes(value) for name, value in arrays.items()}
            files["json"] = json.dumps({"person_id": f"p{person}"}).encode()
            writer.add(f"p{person}-k{k}", files, {"person_id": f"p{person}"})
        writer.close({"items": PER_PERSON, "skipped": [], "fields": sorted(writer.samples[0]["members"]),
                      "notes": ["stand-in data for tests"], "vae": {"scaling_factor": 0.18215, "shift_factor": 0.0}})
    finish(folder, PERSONS)
    return folder / "manifest.json"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("facecrafter_data"))


def config_for(stage, shards, output_dir, *overrides):
    return load_config(CONFIGS[stage], [f"data.shards={shards}", f"output_dir={output_dir}", "logging.progress_bar=false",
                                        "sampling.every_steps=0", "train.batch_size=2", "facecrafter.lmk_init=null",
                                        "facecrafter.emo_init=null", *overrides])


def randomise_branches(crafter, seed: int = 0):
    """V starts at zero (a no-op branch): random K/V so that switching a branch on changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in crafter.named_parameters():
            if ".kv." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def joint(manifest, tmp_path_factory):
    config = config_for("facecrafter_joint", manifest, tmp_path_factory.mktemp("joint"))
    host = load_host_models(config, torch.device("cpu"), torch.float32, need_vae=False)
    stage = build_stage(config, host, torch.device("cpu"))
    randomise_branches(stage.module.crafter)
    generator = torch.Generator().manual_seed(5)
    rows = 4
    inputs = {"noisy": torch.randn(rows, 4, 8, 8, generator=generator), "timesteps": torch.tensor([10, 300, 600, 900]),
              "id_embeddings": torch.nn.functional.normalize(torch.randn(2, 16, generator=generator), dim=1),
              "source": torch.tensor([0, 0, 1, 1]),
              "alphas": torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]),
              "landmark_images": torch.rand(2, 3, 64, 64, generator=generator), "emotion": torch.rand(2, 10, generator=generator)}
    return stage, inputs


def test_rows_switched_off_are_the_base_unet_output_bit_for_bit(joint):
    stage, inputs = joint
    with torch.no_grad():
        mixed = stage.module(**inputs)
        context = stage.host.id_encoder.encode(inputs["id_embeddings"])[inputs["source"]]
        # the base model: the same tiny UNet with diffusers' own attention processors, no branches
        base = tiny_unet({"seed": 0}).eval()(inputs["noisy"], inputs["timesteps"], encoder_hidden_states=context).sample
    for row in (0, 3):  # (0, 0)
        assert torch.equal(mixed[row], base[row]), row
    for row in (1, 2):
        assert (mixed[row] - base[row]).abs().max() > 1e-3, row


def test_attention_record_equals_a_separate_recording_pass(joint):
    stage, inputs = joint
    record = {}
    output = stage.module(**inputs, record=record)
    # 16 SD1.5 cross-attention layers, each with the autograd graph kept for the AD loss
    assert sorted(record) == sorted(layer.diffusers_name for layer in cross_attention_layers(SD15))
    assert all(tensor.requires_grad for tensor in record.values())
    seen, handles = {}, []
    for name in record:
        attention = stage.host.unet.get_submodule(name)
        handles.append(attention.to_out[0].register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, args[0].detach())))
    try:
        with torch.no_grad():
            again = stage.module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(again, output.detach())
    for name, tensor in record.items():
        assert torch.equal(tensor.detach(), seen[name]), name


def test_differentiable_encode_is_encode_with_gradients_to_the_text_model(joint):
    stage, inputs = joint
    encoder = stage.host.id_encoder
    trained = encoder.encode_differentiable(inputs["id_embeddings"])
    assert torch.equal(trained.detach(), encoder.encode(inputs["id_embeddings"])) and not encoder.encode(inputs["id_embeddings"]).requires_grad
    trained.square().sum().backward()
    embedding = encoder.text_model.get_input_embeddings().weight
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    encoder.text_model.zero_grad(set_to_none=True)


def test_trainable_parameters_follow_the_key_value_formula(manifest, tmp_path):
    from adapters.facecrafter import (
        EmotionEncoder,
        EmotionEncoderConfig,
        LandmarkEncoder,
        LandmarkEncoderConfig,
    )

    counts = {}
    for stage in CONFIGS:
        config = config_for(stage, manifest, tmp_path / stage)
        host = load_host_models(config, torch.device("cpu"), torch.float32, need_vae=False)
        built = build_stage(config, host, "cpu")
        counts[stage] = sum(p.numel() for group in built.parameter_groups(built.module) for p in group["params"])
        widths = sum(host.unet.get_submodule(layer.diffusers_name).to_k.out_features for layer in cross_attention_layers(SD15))
    lmk = LandmarkEncoderConfig(image_size=64, channels=(8, 8, 16, 16, 32, 32), token_dim=32, res_blocks=1, groups=8)
    emo = EmotionEncoderConfig(hidden_dim=32, token_dim=32, num_tokens=4)
    encoder_sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in
                     (("lmk", LandmarkEncoder(lmk)), ("emo", EmotionEncoder(emo)))}
    # bias-free K and V from d = 32 tokens to every layer's width, plus the module
    assert counts["facecrafter_lmk"] == 2 * 32 * widths + encoder_sizes["lmk"]
    assert counts["facecrafter_emo"] == 2 * 32 * widths + encoder_sizes["emo"]
    text_model = sum(p.numel() for p in host.id_encoder.text_model.parameters())
    assert counts["facecrafter_joint"] == counts["facecrafter_lmk"] + counts["facecrafter_emo"] + text_model


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_each_stage_lowers_its_loss_on_a_fixed_batch(manifest, tmp_path, stage):
    # one person's shard: with batch 3 every step sees the same three targets
    trainer = Trainer(config_for(stage, manifest.parent / shard_name(0), tmp_path, "train.batch_size=3", "train.max_steps=15",
                                 "train.learning_rate=1e-2", "facecrafter.id_encoder_learning_rate=1e-3",
                                 "checkpointing.every_steps=0"))
    assert len(trainer.dataset) == PER_PERSON
    batch = collate([trainer.dataset[(0, i)] for i in range(PER_PERSON)])
    encoder_before = {k: v.clone() for k, v in trainer.host.id_encoder.text_model.state_dict().items()}

    def fixed_loss():
        with torch.no_grad():
            return sum(float(trainer.stage.loss(trainer.module, batch, torch.Generator().manual_seed(seed)))
                       for seed in range(4)) / 4

    before = fixed_loss()
    result = trainer.run()
    after = fixed_loss()
    assert result.step == 15 and after < 0.9 * before, (before, after)
    assert all(not p.requires_grad for p in trainer.host.unet.parameters())
    encoder_after = trainer.host.id_encoder.text_model.state_dict()
    encoder_moved = any(not torch.equal(encoder_before[k], encoder_after[k]) for k in encoder_before)
    assert encoder_moved == (stage == "facecrafter_joint")
    terms = result.loss_terms[15]
    if stage == "facecrafter_joint":
        # the logged parts add up to the loss; the AD term is already weighted by lambda_AD
        assert result.losses[15] == pytest.approx(terms["loss_sd"] + terms["loss_ad"], rel=1e-5)
        assert 0 < terms["loss_ad"] < 0.0005 * 5 * PER_PERSON * 16  # lambda x at most the pairs' count x cos <= 1
    else:
        assert sorted(terms) == ["loss_sd"] and result.losses[15] == pytest.approx(terms["loss_sd"])


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_killed_run_resumes_to_the_same_losses_and_exports(manifest, tmp_path, stage):
    # 12 samples, batch 4: 3 batches an epoch, so 4 steps cross an epoch (partners are redrawn per epoch);
    # a sample grid at each checkpoint
    common = ["train.max_steps=4", "checkpointing.every_steps=2", "train.batch_size=4", "sampling.every_steps=2",
              "sampling.num_samples=2", "sampling.num_inference_steps=2"]
    uninterrupted = Trainer(config_for(stage, manifest, tmp_path / "a", *common)).run()

    resumed_trainer, resumed = resume_after_kill(lambda: Trainer(config_for(stage, manifest, tmp_path / "b", *common)), 2,
                                                 uninterrupted)
    for step in (3, 4):
        assert resumed.loss_terms[step] == uninterrupted.loss_terms[step], step
    first, second = FaceCrafter.from_file(uninterrupted.export_path), FaceCrafter.from_file(resumed.export_path)
    assert sorted(first.modules_present()) == sorted({"facecrafter_lmk": ["lmk"], "facecrafter_emo": ["emo"]}.get(stage, ["lmk", "emo"]))
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    if stage == "facecrafter_joint":
        tokenizer = tmp_path / "a" / "tiny_tokenizer"
        encoders = [Arc2FaceIDEncoder.from_folders(folder / "id_encoder", tokenizer) for folder in (tmp_path / "a", tmp_path / "b")]
        vectors = torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), dim=1)
        assert torch.equal(encoders[0].encode(vectors), encoders[1].encode(vectors))
        # the exported negative is the original encoder's: the trained encoder on "" differs from it
        original = resumed_trainer.stage.negative
        assert torch.equal(encoders[0].encode_negative(1), original)
        plain = Arc2FaceIDEncoder(encoders[0].text_model, encoders[0].tokenizer)
        assert (plain.encode_negative(1) - original).abs().max() > 1e-6


def test_joint_stage_takes_the_pretraining_exports(manifest, tmp_path):
    exports = {}
    for name in ("lmk", "emo"):
        result = Trainer(config_for(f"facecrafter_{name}", manifest, tmp_path / name, "train.max_steps=1")).run()
        exports[name] = result.export_path
    config = config_for("facecrafter_joint", manifest, tmp_path / "joint", f"facecrafter.lmk_init={exports['lmk']}",
                        f"facecrafter.emo_init={exports['emo']}", "facecrafter.layer_set=up")
    host = load_host_models(config, torch.device("cpu"), torch.float32, need_vae=False)
    crafter = build_stage(config, host, "cpu").module.crafter
    for name, path in exports.items():
        expected = getattr(FaceCrafter.from_file(path), name).state_dict()
        got = getattr(crafter, name).state_dict()
        assert all(torch.equal(got[key], expected[key]) for key in expected), name
    assert crafter.layer_set == "all"  # the files' layer set, not the config's
    with pytest.raises(ValueError, match="has no emo section"):
        build_stage(config_for("facecrafter_joint", manifest, tmp_path / "bad", f"facecrafter.emo_init={exports['lmk']}"),
                    host, "cpu")


def test_config_refuses_impossible_facecrafter_settings(manifest, tmp_path):
    with pytest.raises(ConfigError, match="ad_token_reduction"):
        config_for("facecrafter_joint", manifest, tmp_path, "facecrafter.ad_token_reduction=max")
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        config_for("facecrafter_joint", manifest, tmp_path, "train.gradient_checkpointing=true")
    with pytest.raises(ConfigError, match="facecrafter.partner"):
        config_for("facecrafter_lmk", manifest, tmp_path, "facecrafter.partner=other")


def use_folders(patch, name: str, *paths) -> None:
    """Make ComfyUI's registered model folder ``name`` exactly ``paths`` (undone by ``patch``)."""
    import folder_paths

    extensions = folder_paths.folder_names_and_paths[name][1]
    patch.setitem(folder_paths.folder_names_and_paths, name, ([str(path) for path in paths], extensions))


@pytest.mark.comfyui
def test_joint_exports_load_in_comfyui_change_its_output_and_drive_the_guider(comfy, manifest, tmp_path, monkeypatch):
    import comfy.samplers as samplers

    from hosts.diffusers import attach_adapters, facecrafter_kwargs
    from support.tiny_facecrafter import landmark_images
    from support.tiny_unets import comfy_model

    tokenizer = comfy.path / "comfy" / "sd1_tokenizer"  # the tokenizer Load Arc2Face ID Encoder uses
    trainer = Trainer(config_for("facecrafter_joint", manifest, tmp_path, "train.max_steps=3", "train.learning_rate=1e-2",
                                 f"model.tokenizer={tokenizer}", "facecrafter.id_encoder_learning_rate=1e-3"))
    result = trainer.run()
    nodes = comfy.pack.nodes
    use_folders(monkeypatch, "expression_adapters", tmp_path)
    use_folders(monkeypatch, "arc2face", tmp_path)
    [crafter] = nodes.facecrafter_nodes.LoadFaceCrafter.execute(facecrafter_name=result.export_path.name).result
    assert sorted(crafter.modules_present()) == ["emo", "lmk"] and crafter.landmark_style["size"] == 64
    [id_encoder] = nodes.identity_nodes.LoadArc2FaceIDEncoder.execute(encoder_name="id_encoder", download_missing=False).result
    embedding = torch.nn.functional.normalize(torch.randn(1, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    positive, negative = nodes.identity_nodes.Arc2FaceIDConditioning.execute(id_encoder, embedding).result
    # the trained encoder for the positive; the original encoder's negative, as in training
    torch.testing.assert_close(positive[0][0], trainer.host.id_encoder.encode(embedding), atol=1e-5, rtol=1e-5)
    assert torch.equal(negative[0][0], trainer.stage.negative)

    unet = tiny_unet({"seed": 0}).eval()  # the smoke configs' base UNet
    model = comfy_model("SD1.5", unet.state_dict())
    image, emotion = landmark_images(size=64), torch.rand(1, 10, generator=torch.Generator().manual_seed(3))
    [patched] = nodes.facecrafter_nodes.ApplyFaceCrafter.execute(model, crafter, 1.0, 1.0, 0.0, 1.0, landmark_image=image,
                                                                  emotion=emotion).result
    generator = torch.Generator().manual_seed(4)
    x, t, context = torch.randn(1, 4, 8, 8, generator=generator), torch.full((1,), 500.0), positive[0][0]

    def comfy_output(m):
        options = dict(m.model_options["transformer_options"], cond_or_uncond=[0], sigmas=torch.ones(1))
        with torch.no_grad():
            return m.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)

    with_modules = comfy_output(patched)
    assert (with_modules - comfy_output(model)).abs().max() > 1e-3
    # and ComfyUI computes what the training host computes with the trained modules
    attach_adapters(unet, crafter.modules_present())
    with torch.no_grad():
        kwargs = facecrafter_kwargs(crafter, crafter.landmark_tokens(image.permute(0, 3, 1, 2)), crafter.emotion_tokens(emotion),
                                  1.0, 1.0)
        expected = unet(x, t, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample
    torch.testing.assert_close(with_modules, expected, atol=1e-4, rtol=1e-4)

    def guided(w_lmk, w_emo):
        [guider] = nodes.facecrafter_nodes.FaceCrafterGuider.execute(patched, positive, negative, 2.5, w_lmk, w_emo).result
        sigmas = samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "simple", 3)
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        return guider.sample(noise, torch.zeros_like(noise), samplers.sampler_object("ddpm"), sigmas, seed=5)

    with_control, identity_only = guided(2.0, 2.0), guided(0.0, 0.0)
    assert torch.isfinite(with_control).all() and (with_control - identity_only).abs().max() > 1e-3


def test_eq_6_on_hand_made_predictions():
    from adapters.facecrafter import multi_condition_guidance

    uncond, with_id, with_lmk, with_emo = (torch.tensor([v]) for v in (0.0, 1.0, 3.0, 0.0))
    # 0 + 2.5 (1 - 0) + 2 (3 - 1) + 2 (0 - 1) = 4.5; LMK alone: 2.5 + 4 = 6.5
    assert float(multi_condition_guidance(uncond, with_id, (with_lmk, with_emo), 2.5, (2.0, 2.0))) == 4.5
    assert float(multi_condition_guidance(uncond, with_id, (with_lmk,), 2.5, (2.0,))) == 6.5


def test_previews_are_sampled_with_the_guiders_eq_6(joint):
    from diffusers import DPMSolverMultistepScheduler

    from hosts.diffusers import facecrafter_kwargs
    from training.sampling import denoise

    stage, inputs = joint
    batch = {"source_id": inputs["id_embeddings"], "landmark_image": inputs["landmark_images"],
             "emotion": inputs["emotion"]}
    shape = (2, 4, 8, 8)
    got = denoise(stage.host.unet, stage.host.noise_scheduler.config, stage.sampling_inputs(stage.module, batch), shape, 1,
                  3.0, torch.Generator().manual_seed(1))
    # by hand: one UNet call per prediction with its switches, Eq. 6 with the paper's 2.5 / 2.0 / 2.0, one step
    scheduler = DPMSolverMultistepScheduler.from_config(stage.host.noise_scheduler.config, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(1)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    crafter = stage.module.crafter
    with torch.no_grad():
        context = stage.host.id_encoder.encode(batch["source_id"])
        negative = stage.negative.expand_as(context)
        lmk, emo = crafter.lmk.tokens(batch["landmark_image"]), crafter.emo.tokens(batch["emotion"])

        def predict(text, alpha_lmk, alpha_emo):
            kwargs = facecrafter_kwargs(crafter, lmk, emo, alpha_lmk, alpha_emo)
            x = scheduler.scale_model_input(latents, t)
            return stage.host.unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample

        e_uncond, e_id, e_lmk, e_emo = (predict(negative, 0.0, 0.0), predict(context, 0.0, 0.0),
                                        predict(context, 1.0, 0.0), predict(context, 0.0, 1.0))
    guided = e_uncond + 2.5 * (e_id - e_uncond) + 2.0 * (e_lmk - e_id) + 2.0 * (e_emo - e_id)
    expected = scheduler.step(guided, t, latents).prev_sample
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)  # float32 batched vs one call each
    # plain CFG on the full condition (what previews did before) is another picture
    plain = e_uncond + 3.0 * (predict(context, 1.0, 1.0) - e_uncond)
    scheduler.set_timesteps(1)
    assert (scheduler.step(plain, t, latents).prev_sample - got).abs().max() > 1e-2
