"""The adapter/host seam (``adapters.branches``): each branch condition's rows and scales, checked against
rows laid out by hand from the branch's own projections, and the diffusers processor given a condition and
a row layout against the same processor given those hand-made rows."""

from __future__ import annotations

import torch

from adapters.branches import TokenCondition, add_branch
from adapters.facecrafter import GUIDANCE_SWITCHES, SWITCHES_KEY, SwitchedCondition
from adapters.layers import SD15, cross_attention_layers
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
