"""The papers' recipe numbers, each pinned by a value worked out by hand (never by the function under test):
EmojiDiff's ICA weights (supp. B.1: L_ft = L_sd + 0.08 L_id + 10 L_exp) and Adam settings (2e-5 for training,
5e-6 for fine-tuning, beta1 0.5, beta2 0.999), Arc2Face's learning rates (supp.: 1e-4 adapter, 1e-5 LoRA),
FaceCrafter's lambda_AD = 0.0005, and the inference defaults of the nodes and the Arc2Face workflows (E-Adapter
lambdas 1 and 1; Guider w_ID 2.5, w_LMK 2.0, w_EMO 2.0; Reference LoRA 0.8; CFG 3 with 25 DPM-Solver++ steps)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"


def stage_config(name):
    return load_config(CONFIGS / name, check_paths=False)


@pytest.mark.parametrize("name", ["emojidiff_ica_sd15.yaml", "emojidiff_ica_sdxl.yaml", "emojidiff_ica_smoke.yaml"])
def test_ica_total_is_l_sd_plus_0_08_l_id_plus_10_l_exp(name):
    from training.stages.emojidiff import EmojiDiffICAStage

    config = stage_config(name)
    terms = {"loss_sd": torch.tensor(1.5), "loss_id": torch.tensor(0.25), "loss_exp": torch.tensor(0.125)}
    # the stage's own loss(), on its config, with hand-made terms in place of one draw's
    stage = SimpleNamespace(cfg=config["emojidiff"], terms=lambda *args, **kwargs: terms)
    total = EmojiDiffICAStage.loss(stage, None, None, None)
    assert float(total) == pytest.approx(1.5 + 0.02 + 1.25)  # 0.08 x 0.25 and 10 x 0.125
    assert float(stage.loss_terms["loss_id_weighted"]) == pytest.approx(0.02)
    assert float(stage.loss_terms["loss_exp_weighted"]) == pytest.approx(1.25)
    assert int(config["emojidiff"]["r_tmax"]) == 600  # what terms() hands to ani_latent (see test_training_emojidiff)


# (config, learning rate, beta1, beta2, weight decay): EmojiDiff supp. B.1 for its stages (Adam: no decay);
# Arc2Face supp. for the adapter (1e-4) and the Reference LoRA (1e-5), which names AdamW but no betas (0.9, 0.999).
ADAM = [("emojidiff_base.yaml", 2e-5, 0.5, 0.999, 0.0), ("emojidiff_refined_sd15.yaml", 2e-5, 0.5, 0.999, 0.0),
        ("emojidiff_refined_sdxl.yaml", 2e-5, 0.5, 0.999, 0.0), ("emojidiff_ica_sd15.yaml", 5e-6, 0.5, 0.999, 0.0),
        ("emojidiff_ica_sdxl.yaml", 5e-6, 0.5, 0.999, 0.0), ("expression_adapter.yaml", 1e-4, 0.9, 0.999, 0.01),
        ("reference_lora.yaml", 1e-5, 0.9, 0.999, 0.01)]


@pytest.mark.parametrize(("name", "lr", "beta1", "beta2", "decay"), ADAM)
def test_stage_configs_carry_the_papers_adam_settings(name, lr, beta1, beta2, decay):
    train = stage_config(name)["train"]
    assert float(train["learning_rate"]) == lr
    assert (float(train["adam_beta1"]), float(train["adam_beta2"])) == (beta1, beta2)
    assert float(train["weight_decay"]) == decay


def test_ad_weight_0_0005_on_a_hand_computed_attention_map():
    from training.mixed_conditioning import MixedRows
    from training.stages.facecrafter import FaceCrafterStage

    fc = stage_config("facecrafter_joint.yaml")["facecrafter"]
    # one example, rows ID and ID+LMK (one AD pair), 4 tokens (a 2 x 2 grid) x 2 channels
    output = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [1, 1]],
                           [[1.0, 0], [0, 1], [0, 1], [-1, -1]]])
    # per-token cosines 1, 0, 1, -1; the 4 x 4 face mask's top half resizes (nearest) to tokens 0 and 1
    mask = torch.zeros(1, 4, 4)
    mask[:, :2] = 1
    rows = MixedRows(torch.tensor([0, 0]), torch.tensor([[0.0, 0], [1, 0]]), ["ID", "ID+LMK"])
    stage = SimpleNamespace(fc=fc)
    weighted = float(fc["ad_weight"]) * FaceCrafterStage.ad_loss(stage, {"layer": output}, mask, rows)
    # masked mean of relu(1), relu(0) = 0.5, one pair summed, one layer: L_AD = 0.5; lambda_AD x 0.5
    assert float(weighted) == pytest.approx(0.0005 * 0.5, rel=1e-6)


@pytest.mark.comfyui
def test_node_defaults_are_the_papers(comfy):
    nodes = comfy.pack.nodes

    def default(node, name):
        return next(i for i in node.define_schema().inputs if i.id == name).default

    assert default(nodes.e_adapter_nodes.ApplyEAdapter, "id_strength") == 1.0  # lambda_id (EmojiDiff supp. B.1)
    assert default(nodes.e_adapter_nodes.ApplyEAdapter, "expression_strength") == 1.0  # lambda_exp
    guider = nodes.facecrafter_nodes.FaceCrafterGuider
    assert (default(guider, "w_id"), default(guider, "w_lmk"), default(guider, "w_emo")) == (2.5, 2.0, 2.0)
    assert default(nodes.reference_nodes.ApplyReferenceAdapter, "lora_strength") == 0.8  # Arc2Face supp.


ARC2FACE_WORKFLOWS = ["arc2face_expression.json", "arc2face_id.json", "arc2face_id_expression.json",
                      "arc2face_reference.json", "expression_editing.json"]


@pytest.mark.parametrize("name", ARC2FACE_WORKFLOWS)
def test_arc2face_workflows_sample_with_cfg_3_and_25_dpm_solver_steps(name):
    workflow = json.loads((ROOT / "workflows" / "api" / name).read_text())
    samplers = [node["inputs"] for node in workflow.values() if node["class_type"] == "KSampler"]
    assert samplers
    for inputs in samplers:  # Arc2Face supp.: "DPM-Solver with 25 denoising steps and a guidance scale of 3"
        assert (inputs["cfg"], inputs["steps"], inputs["sampler_name"]) == (3.0, 25, "dpmpp_2m")
