"""The Reference Adapter LoRA file: both published key forms, alpha, and wrong files."""

import pytest
import torch

from adapters.checkpoints import AdapterFileError, write_safetensors
from adapters.lora import ReferenceLora
from support.tiny_unets import random_reference_lora_state


@pytest.mark.parametrize("form", ["diffusers", "peft"])
def test_both_published_key_forms_read_the_same(tmp_path, form):
    state = random_reference_lora_state(form=form)
    write_safetensors(state, tmp_path / "pytorch_lora_weights.safetensors")
    lora = ReferenceLora.from_file(tmp_path / "pytorch_lora_weights.safetensors")
    # the expected matrices are the file's own tensors, named as diffusers saves them
    published = random_reference_lora_state(form="diffusers")
    modules = {key.removeprefix("unet.").removesuffix(".lora.down.weight") for key in published if key.endswith(".lora.down.weight")}
    assert set(lora.modules) == modules and len(modules) == 64 and lora.rank == 4
    for module in modules:
        assert torch.equal(lora.modules[module].down, published[f"unet.{module}.lora.down.weight"])
        assert torch.equal(lora.modules[module].up, published[f"unet.{module}.lora.up.weight"])
        assert lora.modules[module].scale == 1.0  # alpha absent: alpha = rank


def test_alpha_scales_the_delta():
    lora = ReferenceLora.from_state_dict(random_reference_lora_state(alpha=2.0))
    weights = lora.modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    torch.testing.assert_close(weights.delta(), 0.5 * weights.up @ weights.down)


def test_state_dict_round_trip_uses_the_published_form():
    lora = ReferenceLora.from_state_dict(random_reference_lora_state(form="peft"))
    state = lora.state_dict()
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight" in state
    again = ReferenceLora.from_state_dict(state)
    assert all(torch.equal(again.modules[m].down, w.down) for m, w in lora.modules.items())


def test_a_file_of_the_wrong_kind_names_missing_keys(tmp_path):
    state = random_reference_lora_state()
    cross_attention = {k.replace(".attn1.", ".attn2."): v for k, v in state.items()}
    with pytest.raises(AdapterFileError, match=r"missing keys: down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_k"):
        ReferenceLora.from_state_dict(cross_attention, tmp_path / "ip_adapter_lora.safetensors")
    with pytest.raises(AdapterFileError, match="not LoRA weights: image_proj.proj.weight"):
        ReferenceLora.from_state_dict({**state, "image_proj.proj.weight": torch.zeros(1)})
    del state["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v.lora.up.weight"]
    with pytest.raises(AdapterFileError, match="has only its down matrix"):
        ReferenceLora.from_state_dict(state)
