"""training.train on the smoke config: a tiny random SD1.5-shaped UNet, tiny VAE and ID encoder,
trained on real pictures prepared by training.prepare with tiny official-format face models.

Checks that the Expression Adapter stage overfits a fixed batch, that a killed run resumes to
exactly the losses and weights of an uninterrupted one, and that the exported file loads as
published and changes a real ComfyUI's output through the pack's patch.
"""

from __future__ import annotations

import pytest
import torch

from adapters.expression_adapter import ExpressionAdapter
from support.training_helpers import PreparedModels, resume_after_kill, write_pictures
from training.config import ConfigError, load_config
from training.data import collate
from training.prepare import main as prepare
from training.train import Trainer
from training.train import main as train_main

pytestmark = [pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]
SMOKE = "training/configs/smoke.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_data")
    models = PreparedModels(root)
    if models.insightface is None:
        pytest.skip("shared/testdata/t1_faces.npz (the stand-in detector's faces) not found")
    pictures = write_pictures(root / "pictures")
    out = root / "shards"
    prepare(models.prepare_args(pictures, out, "--items-per-shard", "2", "--vae", str(models.vae)))
    return out


def smoke_config(shards, output_dir, *overrides):
    return load_config(SMOKE, [f"data.shards={shards}", f"output_dir={output_dir}", "logging.progress_bar=false",
                               "sampling.every_steps=0", "train.batch_size=2", *overrides])


def test_expression_adapter_stage_overfits_a_fixed_batch(shards, tmp_path):
    # shard 0 holds two samples: with batch 2 every step sees the same two images
    config = smoke_config(shards / "shard-000000.tar", tmp_path, "train.max_steps=30", "train.learning_rate=1e-2",
                          "checkpointing.every_steps=0")
    trainer = Trainer(config)
    assert len(trainer.dataset) == 2
    batch = collate([trainer.dataset[0], trainer.dataset[1]])

    def fixed_loss():
        with torch.no_grad():
            return sum(float(trainer.stage.loss(trainer.module, batch, torch.Generator().manual_seed(seed), dropout=False))
                       for seed in range(4)) / 4

    before = fixed_loss()
    result = trainer.run()
    after = fixed_loss()
    assert result.step == 30 and after < 0.9 * before, (before, after)
    # only the adapter trains: its parameters are a small part of the model
    assert 0 < result.trainable_parameters < result.total_parameters / 10
    assert all(not p.requires_grad for p in trainer.host.unet.parameters())


def test_killed_run_resumes_to_the_same_losses_and_weights(shards, tmp_path):
    common = ["train.max_steps=6", "checkpointing.every_steps=3", "train.gradient_accumulation_steps=2",
              "sampling.every_steps=3", "sampling.num_samples=2"]
    # 5 samples, batch 2: two batches an epoch, so the run crosses epochs, with accumulation and dropout
    uninterrupted = train_main(["--config", SMOKE, "--set", f"data.shards={shards / 'manifest.json'}",
                                "--set", f"output_dir={tmp_path / 'a'}", "--set", "train.batch_size=2",
                                "--set", "logging.progress_bar=false", *[x for o in common for x in ("--set", o)]])
    assert sorted(uninterrupted.losses) == [1, 2, 3, 4, 5, 6]

    _, resumed = resume_after_kill(lambda: Trainer(smoke_config(shards / "manifest.json", tmp_path / "b", *common)),
                                   3, uninterrupted)
    first = ExpressionAdapter.from_file(uninterrupted.export_path).state_dict()
    second = ExpressionAdapter.from_file(resumed.export_path).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    # what a user sees: sample grids, TensorBoard scalars, a kept number of checkpoints
    a = tmp_path / "a"
    assert sorted(p.name for p in (a / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert [p.name for p in sorted((a / "checkpoints").iterdir())] == ["step-0000003", "step-0000006"]
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(a / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5]  # logging.every_steps is 5
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)


def test_gradient_checkpointing_gives_the_same_losses(shards, tmp_path):
    # both with the math attention kernel, so only checkpointing differs between the runs
    plain = Trainer(smoke_config(shards / "manifest.json", tmp_path / "plain", "train.max_steps=2",
                                 "train.attention=math")).run()
    checkpointed = Trainer(smoke_config(shards / "manifest.json", tmp_path / "gc", "train.max_steps=2",
                                        "train.gradient_checkpointing=true", "train.attention=math")).run()
    for step in (1, 2):
        assert checkpointed.losses[step] == pytest.approx(plain.losses[step], rel=1e-5)
    # gradients reach the adapter through the checkpointed blocks: both runs learn the same weights
    first = ExpressionAdapter.from_file(plain.export_path).state_dict()
    second = ExpressionAdapter.from_file(checkpointed.export_path).state_dict()
    initial = Trainer(smoke_config(shards / "manifest.json", tmp_path / "init", "checkpointing.resume=none")).stage.module.adapter.state_dict()
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(first[key], initial[key]) for key in first)


def test_config_errors_name_the_problem(shards, tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'"):
        load_config(SMOKE, ["train.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"data.shards names .*absent.json, which does not exist"):
        load_config(SMOKE, [f"data.shards={tmp_path / 'absent.json'}", "data.demo_if_missing=false"])
    with pytest.raises(ConfigError, match="set exactly one of model.unet"):
        load_config(SMOKE, [f"data.shards={shards}", "model.unet=somewhere"], check_paths=False)
    with pytest.raises(ConfigError, match=r"model.vae names .*nowhere, which does not exist"):
        load_config(SMOKE, [f"data.shards={shards}", "model.vae=nowhere"])


@pytest.mark.comfyui
def test_exported_adapter_loads_and_changes_the_comfyui_output(comfy, shards, tmp_path):
    from hosts.diffusers import attach_adapters
    from support.tiny_unets import comfy_model
    from training.tiny import tiny_unet

    result = Trainer(smoke_config(shards / "manifest.json", tmp_path, "train.max_steps=3")).run()
    adapter = ExpressionAdapter.from_file(result.export_path)
    assert adapter.layout.name == "SD1.5" and adapter.num_tokens == 4 and len(adapter.layers) == 16
    unet = tiny_unet({"seed": 0}).eval()  # the smoke config's base UNet
    model = comfy_model("SD1.5", unet.state_dict())
    expression = torch.randn(1, 55, generator=torch.Generator().manual_seed(3))
    patch = comfy.pack.hosts.comfyui.cross_attention
    with torch.no_grad():
        patched = patch.apply_cross_attention_branch(model, adapter, adapter.expression_tokens(expression),
                                                     adapter.unconditional_tokens(), 1.0, 0.0, 1.0)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    t = torch.full((1,), 500.0)

    def comfy_output(m):
        options = dict(m.model_options["transformer_options"], cond_or_uncond=[0], sigmas=torch.ones(1))
        with torch.no_grad():
            return m.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)

    plain, with_adapter = comfy_output(model), comfy_output(patched)
    assert (with_adapter - plain).abs().max() > 1e-3
    # and ComfyUI computes what the training host computes with the trained adapter
    attach_adapters(unet, {"expression": adapter})
    with torch.no_grad():
        tokens = adapter.expression_tokens(expression)
        expected = unet(x, t, encoder_hidden_states=context,
                        cross_attention_kwargs={"adapter_tokens": {"expression": tokens}}).sample
    torch.testing.assert_close(with_adapter, expected, atol=1e-4, rtol=1e-4)
