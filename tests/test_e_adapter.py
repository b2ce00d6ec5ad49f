"""The E-Adapter library: published files assemble, our file round-trips, parameter counts fit the spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from adapters.checkpoints import AdapterFileError, flatten, read_state_dict
from adapters.e_adapter import EAdapter, ExpressionBranch, IdentityBranch
from adapters.layers import SD15, SDXL, attention_layers, cross_attention_layers
from support.e_adapter_standins import faceid_state, image_state, write_published
from support.random_init import init_devices
from training.tiny import save_published

SD15_EXPRESSION = list(range(1, 32, 2))
SDXL_EXPRESSION = list(range(69, 88, 2))  # up_blocks.0.attentions.1 (spec A1: checkpoint numbers 69-87)


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
def test_published_files_assemble_and_project_as_published(tmp_path, family):
    faceid_path, image_path = write_published(tmp_path, family)
    adapter = EAdapter.from_published(faceid_path, image_path)
    faceid, image = torch.load(faceid_path, weights_only=True), torch.load(image_path, weights_only=True)
    layout = SD15 if family == "SD1.5" else SDXL
    assert adapter.layout is layout
    assert [layer.checkpoint_number for layer in adapter.identity.layers] == [layer.checkpoint_number for layer in cross_attention_layers(layout)]
    expected_exp = SD15_EXPRESSION if family == "SD1.5" else SDXL_EXPRESSION
    assert [layer.checkpoint_number for layer in adapter.expression_branch().layers] == expected_exp
    assert adapter.expression_layers == ("all" if family == "SD1.5" else "emojidiff_expression_sdxl")
    assert adapter.id_recognizer == "w600k_r50.onnx" and adapter.clip_vision == "vit-h"

    # the projections as IP-Adapter defines them (MLPProjModel / ImageProjModel), written out by hand
    embedding = F.normalize(torch.randn(2, 512), dim=-1)
    p = faceid["image_proj"]
    hidden = F.gelu(F.linear(embedding, p["proj.0.weight"], p["proj.0.bias"]))
    expected_id = F.layer_norm(F.linear(hidden, p["proj.2.weight"], p["proj.2.bias"]).reshape(2, 4, -1), (32,),
                               p["norm.weight"], p["norm.bias"])
    clip = torch.randn(2, 1024)
    q = image["image_proj"]
    expected_exp_tokens = F.layer_norm(F.linear(clip, q["proj.weight"], q["proj.bias"]).reshape(2, 4, -1), (32,),
                                       q["norm.weight"], q["norm.bias"])
    with torch.no_grad():
        torch.testing.assert_close(adapter.id_tokens(embedding), expected_id)
        torch.testing.assert_close(adapter.expression_tokens(clip), expected_exp_tokens)
        # unconditional rows: the projection of a zero embedding (IP-Adapter convention), not zero tokens
        zero_id = F.layer_norm(F.linear(F.gelu(p["proj.0.bias"]), p["proj.2.weight"], p["proj.2.bias"]).reshape(1, 4, -1),
                               (32,), p["norm.weight"], p["norm.bias"])
        torch.testing.assert_close(adapter.unconditional_id_tokens(), zero_id)
        zero_exp = F.layer_norm(q["proj.bias"].reshape(1, 4, -1), (32,), q["norm.weight"], q["norm.bias"])
        torch.testing.assert_close(adapter.unconditional_expression_tokens(), zero_exp)
        layer = adapter.expression_branch().layers[0]
        key, _ = adapter.expression.branch(layer).keys_values(expected_exp_tokens)
        torch.testing.assert_close(key, expected_exp_tokens @ image["ip_adapter"][f"{layer.checkpoint_number}.to_k_ip.weight"].T)


def test_faceid_lora_keys_are_split_off_by_processor_number(tmp_path):
    faceid_path, image_path = write_published(tmp_path, "SD1.5")
    adapter = EAdapter.from_published(faceid_path, image_path)
    faceid = torch.load(faceid_path, weights_only=True)["ip_adapter"]
    # 32 processors x (to_q, to_k, to_v, to_out.0); processor N is the N-th attention layer in diffusers order
    assert len(adapter.lora) == 32 * 4
    assert torch.equal(adapter.lora["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].down, faceid["0.to_q_lora.down.weight"])
    assert torch.equal(adapter.lora["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"].up, faceid["1.to_out_lora.up.weight"])
    assert torch.equal(adapter.lora["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].down, faceid["31.to_k_lora.down.weight"])
    assert all(weights.scale == 1.0 for weights in adapter.lora.values())  # FaceID's LoRA has no alpha: scale 1


def test_faceid_file_without_lora_gives_no_lora(tmp_path):
    faceid_path, image_path = write_published(tmp_path, "SD1.5", lora_rank=None)
    assert EAdapter.from_published(faceid_path, image_path).lora == {}


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
def test_our_file_round_trips_with_prefixes_and_metadata(tmp_path, family):
    adapter = EAdapter.from_published(*write_published(tmp_path, family))
    path = tmp_path / "e_adapter.safetensors"
    adapter.save(path)
    keys = set(read_state_dict(path))
    expected_exp = SD15_EXPRESSION if family == "SD1.5" else SDXL_EXPRESSION
    layout = SD15 if family == "SD1.5" else SDXL
    assert {k for k in keys if k.startswith("exp.ip_adapter.")} == {f"exp.ip_adapter.{n}.to_{kv}_ip.weight" for n in expected_exp for kv in "kv"}
    assert {k for k in keys if k.startswith("id.ip_adapter.")} == {
        f"id.ip_adapter.{layer.checkpoint_number}.to_{kv}_ip.weight" for layer in cross_attention_layers(layout) for kv in "kv"}
    assert {k for k in keys if "image_proj" in k} == {f"id.image_proj.{k}" for k in ("proj.0.weight", "proj.0.bias", "proj.2.weight",
                                                                                        "proj.2.bias", "norm.weight", "norm.bias")} | {
        f"exp.image_proj.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")}
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"kind": "EmojiDiff E-Adapter", "layout": family, "clip_vision": "vit-h", "id_recognizer": "w600k_r50.onnx",
                                     "expression_layers": "all" if family == "SD1.5" else "emojidiff_expression_sdxl"}
    loaded = EAdapter.from_file(path)
    assert loaded.expression_layers == adapter.expression_layers and loaded.layout is layout
    for name, tensor in adapter.identity.state_dict().items():
        assert torch.equal(loaded.identity.state_dict()[name], tensor)
    for name, tensor in adapter.expression_branch().state_dict().items():
        assert torch.equal(loaded.expression.state_dict()[name], tensor)
    # the file holds only its own expression layers: another set that needs more is refused, naming the set
    if family == "SDXL":
        with pytest.raises(ValueError, match="expression layers 'all'.*holds the set 'emojidiff_expression_sdxl'"):
            loaded.expression_branch("all")


def test_loaded_branches_are_the_files_tensors_in_float32(tmp_path, monkeypatch):
    """The published files are float16: the branches hold their tensors as float32 on the CPU (as loading into a
    float32 module always gave), none left on the meta device, the LoRA as saved; our float32 file reloads as
    saved. No random init is computed on the way."""
    faceid = {part: {k: v.half() for k, v in tensors.items()} for part, tensors in faceid_state("SDXL").items()}
    image = {part: {k: v.half() for k, v in tensors.items()} for part, tensors in image_state("SDXL").items()}
    initialised = init_devices(monkeypatch)
    adapter = EAdapter.from_published(*save_published(tmp_path, SDXL, faceid, image))
    assert initialised and set(initialised) == {"meta"}

    def assert_holds(branch, file_state):
        expected = {f"{part}.{k}": v for part, tensors in file_state.items() for k, v in tensors.items() if "lora" not in k}
        parameters = dict(branch.named_parameters())
        assert set(parameters) == set(expected) and not list(branch.buffers())
        for name, parameter in parameters.items():
            assert parameter.device == torch.device("cpu") and parameter.dtype == torch.float32, name
            assert torch.equal(parameter.detach(), expected[name].float()), name

    assert_holds(adapter.identity, faceid)
    assert_holds(adapter.expression, image)
    down = faceid["ip_adapter"]["1.to_k_lora.down.weight"]
    lora = adapter.lora[f"{attention_layers(SDXL)[1].diffusers_name}.to_k"]
    assert lora.down.dtype == torch.float16 and torch.equal(lora.down, down)

    path = tmp_path / "e_adapter.safetensors"
    adapter.save(path)
    saved = read_state_dict(path)
    loaded = EAdapter.from_file(path)
    loaded_state = {f"id.{k}": v for k, v in loaded.identity.named_parameters()}
    loaded_state |= {f"exp.{k}": v for k, v in loaded.expression.named_parameters()}
    assert set(loaded_state) == set(saved)
    for name, parameter in loaded_state.items():
        assert not parameter.is_meta and parameter.dtype == torch.float32 == saved[name].dtype, name
        assert torch.equal(parameter.detach(), saved[name]), name


def test_other_expression_layer_sets_are_selectable_from_the_published_file(tmp_path):
    adapter = EAdapter.from_published(*write_published(tmp_path, "SDXL"), expression_layers="mid")
    assert [layer.diffusers_name.split(".")[0] for layer in adapter.expression_branch().layers] == ["mid_block"] * 10
    assert len(adapter.expression_branch("all").layers) == 70


def test_a_layer_set_that_selects_no_layer_of_the_model_is_refused(tmp_path):
    """SDXL's Up 0.1 on an SD1.5 adapter selects nothing (SD1.5's up_blocks.0 has no attention): the expression photo
    would change nothing, so Apply E-Adapter says so instead of running without it."""
    adapter = EAdapter.from_published(*write_published(tmp_path, "SD1.5"))
    with pytest.raises(ValueError, match=r"expression layers 'emojidiff_expression_sdxl': it selects no cross-attention "
                                         r"layer of the SD1.5 UNet"):
        adapter.expression_branch("emojidiff_expression_sdxl")
    assert len(adapter.expression_branch("up").layers) == 9


def test_bigg_clip_width_is_accepted(tmp_path):
    adapter = EAdapter.from_published(*write_published(tmp_path, "SDXL", clip_dim=1280))
    assert adapter.clip_vision == "bigG" and adapter.expression_tokens(torch.randn(1, 1280)).shape == (1, 4, 32)


def test_errors_name_the_file_the_kind_and_what_did_not_fit(tmp_path):
    faceid_path, image_path = write_published(tmp_path, "SD1.5")
    with pytest.raises(AdapterFileError, match=r"ip-adapter_sd15.bin is not a valid IP-Adapter FaceID \(E-Adapter ID branch\) "
                                               r"for SD1.5: expected an MLP projection .* image IP-Adapter: give it as the expression file"):
        EAdapter.from_published(image_path, image_path)
    with pytest.raises(AdapterFileError, match=r"ip-adapter-faceid_sd15.bin is not a valid IP-Adapter image \(E-Adapter expression "
                                               r"branch\).*FaceID IP-Adapter: give it as the ID file"):
        EAdapter.from_published(faceid_path, faceid_path)
    sdxl_image = tmp_path / "sdxl" / "ip-adapter_sdxl_vit-h.bin"
    sdxl_image.parent.mkdir()
    torch.save(image_state("SDXL"), sdxl_image)
    with pytest.raises(AdapterFileError, match=r"ip-adapter_sdxl_vit-h.bin .* for SD1.5: it is for SDXL but the FaceID file is for SD1.5"):
        EAdapter.from_published(faceid_path, sdxl_image)
    with pytest.raises(AdapterFileError, match=r"ip-adapter_sd15.bin is not a valid EmojiDiff E-Adapter.*single IP-Adapter file"):
        EAdapter.from_file(image_path)


def test_tokens_refuse_wrong_widths_and_nan_naming_the_clip_model(tmp_path):
    adapter = EAdapter.from_published(*write_published(tmp_path, "SD1.5"))
    with pytest.raises(ValueError, match=r"takes 1024-d CLIP image embeddings from ViT-H/14 .*CLIP-ViT-H-14.* is 768-d, from ViT-L/14: "
                                         r"load ViT-H/14 in Load CLIP Vision"):
        adapter.expression_tokens(torch.randn(1, 768))
    with pytest.raises(ValueError, match=r"shape \(batch, 512\); got \(1, 768\)"):
        adapter.id_tokens(torch.randn(1, 768))
    bad = torch.randn(3, 512)
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"ArcFace embedding has NaN or infinite values in image\(s\) \[2\]"):
        adapter.id_tokens(bad)
    with pytest.raises(ValueError, match=r"CLIP vision embedding has NaN"):
        adapter.expression_tokens(torch.full((1, 1024), float("inf")))


# Parameter counts: spec A1's table, from its formulas with the hand-listed cross-attention widths.
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10


def full_width(layout, layer) -> int:
    block, index = layer.diffusers_name.split(".")[:2]
    levels = [320, 640, 1280, 1280] if layout is SD15 else [320, 640, 1280]
    if block == "mid_block":
        return levels[-1]
    return levels[int(index)] if block == "down_blocks" else levels[len(levels) - 1 - int(index)]


@pytest.mark.parametrize("family, id_proj, id_kv, exp_proj, exp_kv", [
    ("SD1.5", 3_675_648, 19_169_280, 3_150_336, 19_169_280),
    ("SDXL", 8_926_208, 340_787_200, 8_400_896, 52_428_800),
])
def test_parameter_counts_match_the_spec(family, id_proj, id_kv, exp_proj, exp_kv):
    layout = SD15 if family == "SD1.5" else SDXL
    widths = SD15_WIDTHS if family == "SD1.5" else SDXL_WIDTHS
    assert sum(widths) == (12_480 if family == "SD1.5" else 83_200)
    d = layout.context_dim
    assert id_kv == 2 * d * sum(widths)  # spec: 2 x 768 x 12,480 and 2 x 2048 x 83,200
    with torch.device("meta"):  # counted without allocating SDXL's 400 M numbers
        faceid = faceid_state(family, token_dim=d, lora_rank=None, width=full_width)
        image = image_state(family, token_dim=d, width=full_width)
        identity = IdentityBranch.from_state_dict(flatten(faceid))
        expression = ExpressionBranch.from_state_dict(flatten(image))
    adapter = EAdapter(identity, expression)
    expression_branch = adapter.expression_branch()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(identity.image_proj) == id_proj
    assert count(identity.ip_adapter) == id_kv
    assert count(expression.image_proj) == exp_proj
    assert count(expression_branch.ip_adapter) == exp_kv
    trainable = id_proj + exp_proj + exp_kv
    assert round(trainable / 1e6, 1) == (26.0 if family == "SD1.5" else 69.8)
    assert len(attention_layers(layout)) == (32 if family == "SD1.5" else 140)
