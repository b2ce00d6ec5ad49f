"""training.train's reference_lora stage on video frames prepared by training.prepare (tiny models).

The stage trains a peft LoRA on the tiny UNet's self-attention with a frozen Expression Adapter,
reading reference features captured by the same UNet with the LoRA switched off. Checks: the loss
falls on a fixed batch, pairs stay within their clip and window, a killed run resumes to the same
losses, and the export has the published LoRA keys, loads as the Reference Adapter and changes a
real ComfyUI's output.
"""

from __future__ import annotations

import pytest
import torch

from adapters.checkpoints import read_state_dict
from adapters.lora import ReferenceLora
from support.tiny_unets import random_expression_adapter
from support.training_helpers import PreparedModels, resume_after_kill, write_clip
from training.config import ConfigError, load_config
from training.data import collate
from training.prepare import main as prepare
from training.train import Trainer

pytestmark = [pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]
SMOKE = "training/configs/smoke.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_data")
    models = PreparedModels(root)
    if models.insightface is None:
        pytest.skip("shared/testdata/t1_faces.npz (the stand-in detector's faces) not found")
    clips = [write_clip(root / "clip_a.avi", frames=4, fps=10.0), write_clip(root / "clip_b.avi", frames=3, fps=1.0)]
    out = root / "shards"
    prepare(models.prepare_args(clips, out, "--items-per-shard", "1", "--vae", str(models.vae)))
    adapter = root / "expression_adapter.safetensors"
    random_expression_adapter(seed=5).save(adapter)  # stands for stage 1's export (tiny UNet shapes)
    return out / "manifest.json", adapter


def reference_config(data, output_dir, *overrides):
    manifest, adapter = data
    return load_config(SMOKE, ["stage=reference_lora", f"data.shards={manifest}", f"output_dir={output_dir}",
                               f"reference_lora.expression_adapter={adapter}", "reference_lora.rank=4",
                               "reference_lora.pair_window_seconds=1.5", "train.batch_size=2",
                               "logging.progress_bar=false", "sampling.every_steps=0", "export.file=pytorch_lora_weights.safetensors",
                               *overrides])


def test_reference_lora_needs_the_frozen_expression_adapter(data, tmp_path):
    with pytest.raises(ConfigError, match="reference_lora.expression_adapter"):
        load_config(SMOKE, ["stage=reference_lora", f"data.shards={data[0]}"])


def test_pairs_come_from_one_clip_within_the_window(data, tmp_path):
    trainer = Trainer(reference_config(data, tmp_path, "train.max_steps=1"))
    dataset = trainer.dataset
    # clip_a's 4 frames are 0.1 s apart, clip_b's 3 frames 1 s apart: each has a partner within 1.5 s
    assert len(dataset) == 7
    for index in range(len(dataset)):
        item = dataset[(0, index)]
        target, reference = dataset.frames.info(int(dataset.targets[index])), None
        for i in range(len(dataset.frames)):
            if dataset.frames.info(i)["key"] == item["reference_key"]:
                reference = dataset.frames.info(i)
        assert reference["clip_id"] == target["clip_id"] and reference["key"] != target["key"]
        assert abs(reference["time_s"] - target["time_s"]) <= 1.5
        assert item["reference_latent_mean"].shape == item["latent_mean"].shape == (4, 8, 8)
    # the draw depends on the epoch, and is the same every time for one epoch
    draws = {dataset[(epoch, 0)]["reference_key"] for epoch in range(8)}
    assert len(draws) > 1 and dataset[(3, 0)]["reference_key"] == dataset[(3, 0)]["reference_key"]


def test_reference_lora_overfits_resumes_and_exports(data, tmp_path):
    config = reference_config(data, tmp_path / "fit", "train.max_steps=20", "train.learning_rate=1e-2",
                              "checkpointing.every_steps=0", "train.drop_expression=0", "train.drop_id=0", "train.drop_both=0")
    trainer = Trainer(config)
    # only the LoRA matrices: rank 4 x (in + out) on 4 projections of the 16 self-attention layers
    # whose widths sum to 1248 in the tiny UNet
    assert trainer.trainable_parameters == 4 * 4 * 2 * 1248
    assert all(not p.requires_grad for p in trainer.stage.module.adapter.parameters())
    batch = collate([trainer.dataset[(0, 0)], trainer.dataset[(0, 1)]])

    def fixed_loss():
        with torch.no_grad():
            return sum(float(trainer.stage.loss(trainer.module, batch, torch.Generator().manual_seed(s), dropout=False))
                       for s in range(3)) / 3

    before = fixed_loss()
    result = trainer.run()
    assert fixed_loss() < 0.95 * before
    state = read_state_dict(result.export_path)
    assert len(state) == 128 and all(k.startswith("unet.") and (k.endswith(".lora.down.weight") or k.endswith(".lora.up.weight"))
                                     for k in state)
    assert state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"].shape == (4, 32)
    lora = ReferenceLora.from_file(result.export_path)
    assert lora.rank == 4 and all(float(w.up.abs().max()) > 0 for w in lora.modules.values())

    # killed after step 2 and resumed: the same losses as uninterrupted (with condition dropout)
    common = ["train.max_steps=4", "checkpointing.every_steps=2"]
    whole = Trainer(reference_config(data, tmp_path / "whole", *common)).run()

    _, resumed = resume_after_kill(lambda: Trainer(reference_config(data, tmp_path / "cut", *common)), 2, whole)


@pytest.mark.comfyui
def test_exported_lora_changes_the_comfyui_reference_output(comfy, data, tmp_path):
    from support.tiny_unets import comfy_model
    from training.tiny import tiny_unet

    result = Trainer(reference_config(data, tmp_path, "train.max_steps=3", "train.learning_rate=1e-2")).run()
    lora = ReferenceLora.from_file(result.export_path)
    model = comfy_model("SD1.5", tiny_unet({"seed": 0}).state_dict())
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    apply = comfy.pack.hosts.comfyui.reference.apply_reference_adapter
    x = torch.randn(1, 4, 8, 8, generator=generator)

    def output(strength):
        import comfy.model_management

        patched, _ = apply(model, lora, latent, context, strength)
        comfy.model_management.load_models_gpu([patched])  # applies (or swaps) the LoRA weight patches
        options = dict(patched.model_options["transformer_options"], cond_or_uncond=[0], sigmas=torch.ones(1))
        with torch.no_grad():
            return patched.model.diffusion_model(x, timesteps=torch.full((1,), 500.0), context=context,
                                                 transformer_options=options)

    assert (output(1.0) - output(0.0)).abs().max() > 1e-4
