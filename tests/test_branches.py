"""The adapter/host seam (``adapters.branches``): each branch condition's rows and scales, checked against
rows laid out by hand from the branch's own projections, and the diffusers processor given a condition and
a row layout against the same processor given those hand-made rows."""

from __future__ import annotations

import pytest
import torch

from adapters.branches import TokenCondition, add_branch
from adapters.facecrafter import GUIDANCE_SWITCHES, SWITCHES_KEY, SwitchedCondition
from adapters.layers import SD15, cross_attention_layers
from adapters.reference import ReferenceCondition, ReferenceLayer
from adapters.rows import COND, UNCOND, RowLayout
from hosts.diffusers import attach_adapters
from support.tiny_unets import CONTEXT_DIM, diffusers_unet, random_expression_adapter


def test_token_condition_lays_out_condition_and_unconditional_rows_chunk_by_chunk():
    adapter = random_expression_adapter()
    layer = cross_attention_layers(SD15)[3]
    branch = adapter.branch(layer)
    cond = torch.randn(3, 4, CONTEXT_DIM)  # one row per image
    uncond = adapter.unconditional_tokens()
    condition = TokenCondition(adapter, cond, uncond, strength=0.7)
    # the negative's chunk first, as ComfyUI may batch them
    key, value = condition.keys_values(layer, RowLayout(6, [UNCOND, COND]), "cpu", torch.float32)
    expected_key = torch.cat([branch.to_k_ip(uncond).expand(3, -1, -1), branch.to_k_ip(cond)])
    expected_value = torch.cat([branch.to_v_ip(uncond).expand(3, -1, -1), branch.to_v_ip(cond)])
    torch.testing.assert_close(key, expected_key)
    torch.testing.assert_close(value, expected_value)
    assert condition.scales(RowLayout(6, [UNCOND, COND])) == 0.7
    # a context window of frames 2 and 0: its images' rows
    window = RowLayout(4, [COND, UNCOND], frames=[2, 0])
    key, _ = condition.keys_values(layer, window, "cpu", torch.float32)
    torch.testing.assert_close(key[:2], branch.to_k_ip(cond[[2, 0]]))


def test_switched_condition_keeps_one_shared_row_and_scales_rows_by_their_chunks_switch():
    module = random_expression_adapter(seed=1)  # stands for a FaceCrafter module: tokens -> its own K/V per layer
    layer = cross_attention_layers(SD15)[0]
    tokens = torch.randn(1, 4, CONTEXT_DIM)
    condition = SwitchedCondition(module, tokens, strength=0.5, index=1, what="the emotion")
    layout = RowLayout(8, [3, 0, 1, 2])  # the Guider's four predictions, in another order
    key, _ = condition.keys_values(layer, layout, "cpu", torch.float32)
    assert key.shape[0] == 1  # shared, not copied per row
    # EMO (index 1) is on only for prediction 3 (ID+EMO): its two rows come first here
    assert condition.scales(layout, {SWITCHES_KEY: GUIDANCE_SWITCHES}) == [0.5, 0.5, 0, 0, 0, 0, 0, 0]
    # without the Guider's switches: a plain sampler's, on for the positive (index 0) only
    assert condition.scales(layout, {}) == [0, 0, 0.5, 0.5, 0, 0, 0, 0]


class SelfAttention(torch.nn.Module):
    """Stands for a host's self-attention module: the reference read needs only its to_k/to_v."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.to_k = torch.nn.Linear(width, width, bias=False)
        self.to_v = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.to_k.weight.copy_(torch.randn(width, width, generator=generator) / width**0.5)
            self.to_v.weight.copy_(torch.randn(width, width, generator=generator) / width**0.5)


# (layout, whether each chunk reads): the CFG pair, and the FaceCrafter Guider's predictions (0 its negative, the
# others conditional) in a shuffled order: 3 chunks (a weight at 0 drops one) and all 4
GUIDER = {0: False, 1: True, 2: True, 3: True}
REFERENCE_LAYOUTS = {
    "cfg 2 chunks": (lambda chunk: RowLayout(2 * chunk, [UNCOND, COND]), [False, True]),
    "guider 3 chunks": (lambda chunk: RowLayout(3 * chunk, [1, 0, 3], conditional=GUIDER), [True, False, True]),
    "guider 4 chunks": (lambda chunk: RowLayout(4 * chunk, [2, 0, 3, 1], conditional=GUIDER), [True, False, True, True]),
}


@pytest.mark.parametrize("references", ["one reference", "one per image"])
@pytest.mark.parametrize("chunks", list(REFERENCE_LAYOUTS))
def test_reference_condition_reads_its_projected_tokens_on_every_conditional_chunk(references, chunks):
    chunk, width, tokens_per_image = 3, 16, 5
    attention = SelfAttention(width, seed=2)
    generator = torch.Generator().manual_seed(4)
    recorded = torch.randn(1 if references == "one reference" else chunk, tokens_per_image, width, generator=generator)
    other_block = torch.randn(1, tokens_per_image, width, generator=generator)
    condition = ReferenceCondition({("input", 1, 0): recorded, ("output", 11, 0): other_block})
    make_layout, reading_chunks = REFERENCE_LAYOUTS[chunks]
    layout = make_layout(chunk)
    # by hand: image i of a chunk reads reference i (or the one reference), through this layer's to_k/to_v;
    # every reading chunk gets the same rows, in batch order
    with torch.no_grad():
        image_keys = [attention.to_k(recorded[i % recorded.shape[0]]) for i in range(chunk)]
        image_values = [attention.to_v(recorded[i % recorded.shape[0]]) for i in range(chunk)]
        expected_key = torch.stack([key for reads in reading_chunks if reads for key in image_keys])
        expected_value = torch.stack([value for reads in reading_chunks if reads for value in image_values])
        key, value = condition.keys_values(ReferenceLayer(("input", 1, 0), attention), layout, "cpu", torch.float32)
    assert key.shape == (sum(reading_chunks) * chunk, tokens_per_image, width)
    torch.testing.assert_close(key, expected_key)
    torch.testing.assert_close(value, expected_value)
    expected_reads = [reads for reads in reading_chunks for _ in range(chunk)]
    assert condition.scales(layout).tolist() == expected_reads


def test_reference_condition_given_reading_rows_reads_references_in_row_order():
    attention = SelfAttention(8, seed=3)
    recorded = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(6))
    condition = ReferenceCondition({"block": recorded}, reads=torch.tensor([False, True, False, True]))
    with torch.no_grad():
        key, value = condition.keys_values(ReferenceLayer("block", attention), RowLayout(4), "cpu", torch.float32)
        torch.testing.assert_close(key, torch.stack([attention.to_k(recorded[0]), attention.to_k(recorded[1])]))
        torch.testing.assert_close(value, torch.stack([attention.to_v(recorded[0]), attention.to_v(recorded[1])]))
    assert condition.scales(RowLayout(4)).tolist() == [False, True, False, True]


def test_add_branch_with_one_scale_for_all_rows_is_the_scaled_attention():
    generator = torch.Generator().manual_seed(0)
    query, out = torch.randn(2, 6, 16, generator=generator), torch.randn(2, 6, 16, generator=generator)
    key, value = torch.randn(1, 4, 16, generator=generator), torch.randn(1, 4, 16, generator=generator)
    heads, head_dim = 2, 8
    # by hand: softmax(q k^T / sqrt(d)) v per head, one shared key/value row
    q = query.reshape(2, 6, heads, head_dim).transpose(1, 2)
    k = key.expand(2, -1, -1).reshape(2, 4, heads, head_dim).transpose(1, 2)
    v = value.expand(2, -1, -1).reshape(2, 4, heads, head_dim).transpose(1, 2)
    attention = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1) @ v
    expected = out + 0.25 * attention.transpose(1, 2).reshape(2, 6, 16)
    torch.testing.assert_close(add_branch(out, query, key, value, heads, 0.25), expected)


def test_diffusers_processor_given_a_condition_and_layout_equals_hand_laid_rows():
    unet = diffusers_unet("SD1.5")
    adapter = random_expression_adapter()
    attach_adapters(unet, {"expression": adapter})
    cond = torch.randn(2, 4, CONTEXT_DIM)
    uncond = adapter.unconditional_tokens()
    latents = torch.randn(4, 4, 8, 8)
    text = torch.randn(4, 7, CONTEXT_DIM)
    with torch.no_grad():
        by_layout = unet(latents, 10, encoder_hidden_states=text, cross_attention_kwargs={
            "adapter_conditions": {"expression": TokenCondition(adapter, cond, uncond, 0.8)},
            "rows": RowLayout(4, [COND, UNCOND])}).sample
        by_hand = unet(latents, 10, encoder_hidden_states=text, cross_attention_kwargs={
            "adapter_tokens": {"expression": torch.cat([cond, uncond.expand(2, -1, -1)])},
            "adapter_scale": {"expression": 0.8}}).sample
    torch.testing.assert_close(by_layout, by_hand)
