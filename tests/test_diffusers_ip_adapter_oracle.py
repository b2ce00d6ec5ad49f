"""The Expression Adapter in ComfyUI against diffusers' own IP-Adapter path, on the same exp_adapter.bin.

diffusers' loader (``UNet2DConditionModel._load_ip_adapter_weights``, the path the official Arc2Face demo takes,
with its ``IPAdapterAttnProcessor2_0``) and ours (Load / Apply Expression Adapter inside a real ComfyUI) read
one file in the published layout into one tiny SD1.5 UNet; the outputs must agree. The file is written from
diffusers' own numbering of its cross-attention processors (``2n + 1`` in ``attn_processors`` order), not
from our layer catalogue. In the tiny UNet down_blocks.2, the middle block and up_blocks.1 are all 128 wide
(and down_blocks.0 and up_blocks.3 both 32), so weights given to the wrong layers fit their shapes and only
the numbers can tell. Rows: CFG's conditional row with an expression, the unconditional one with the zero
55-vector, as the Arc2Face demo feeds them.
"""

from __future__ import annotations

import pytest
import torch

from support.tiny_unets import CONTEXT_DIM
from support.two_hosts import Hosts

pytestmark = pytest.mark.comfyui
FLAME_DIM = 55


def cross_attention_numbers(unet) -> dict[int, str]:
    """IP-Adapter file numbers as diffusers' loader assigns them: 1, 3, 5, ... over the cross-attention
    processors in ``attn_processors`` order."""
    names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    return {2 * n + 1: name for n, name in enumerate(names)}


def published_file(unet, path, mlp: bool, seed: int = 5) -> dict:
    """exp_adapter.bin for ``unet``: random projection and one random bias-free K/V pair per cross-attention
    processor, numbered as diffusers numbers them. Returns the saved dictionary."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    if mlp:  # IP-Adapter FaceID form: Linear, GELU, Linear, LayerNorm
        image_proj = {"proj.0.weight": random(2 * FLAME_DIM, FLAME_DIM), "proj.0.bias": random(2 * FLAME_DIM),
                      "proj.2.weight": random(4 * CONTEXT_DIM, 2 * FLAME_DIM), "proj.2.bias": random(4 * CONTEXT_DIM)}
    else:  # IP-Adapter image form: Linear, LayerNorm
        image_proj = {"proj.weight": random(4 * CONTEXT_DIM, FLAME_DIM), "proj.bias": random(4 * CONTEXT_DIM)}
    image_proj |= {"norm.weight": 1 + random(CONTEXT_DIM), "norm.bias": random(CONTEXT_DIM)}
    ip_adapter = {}
    for number, name in cross_attention_numbers(unet).items():
        width = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
        ip_adapter[f"{number}.to_k_ip.weight"] = random(width, CONTEXT_DIM)
        ip_adapter[f"{number}.to_v_ip.weight"] = random(width, CONTEXT_DIM)
    saved = {"image_proj": image_proj, "ip_adapter": ip_adapter}
    torch.save(saved, path)
    return saved


def diffusers_output(hosts: Hosts, path, expression: torch.Tensor) -> torch.Tensor:
    """diffusers' IP-Adapter path: its loader, its image projection and its attention processors."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    hosts.unet._load_ip_adapter_weights(torch.load(path, map_location="cpu", weights_only=True))
    processors = [p for name, p in hosts.unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert len(processors) == 16 and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in processors)
    rows = torch.cat([expression, torch.zeros(1, FLAME_DIM)])  # conditional, then unconditional
    with torch.no_grad():
        return hosts.unet(hosts.x, hosts.t, encoder_hidden_states=hosts.context,
                          added_cond_kwargs={"image_embeds": [rows.unsqueeze(1)]}).sample


@pytest.mark.parametrize("mlp", [False, True], ids=["linear_projection", "mlp_projection"])
def test_comfyui_expression_adapter_equals_diffusers_ip_adapter_on_the_published_layout(comfy, tmp_path, mlp):
    import folder_paths

    hosts = Hosts("SD1.5", batch=2)  # the ComfyUI model is built first, from the UNet without IP-Adapter
    widths = {name: hosts.unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
              for name in hosts.unet.attn_processors if name.endswith("attn2.processor")}
    assert widths["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] == \
        widths["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == \
        widths["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"]  # shapes alone cannot tell
    folder = tmp_path / "expression_adapters"
    folder.mkdir()
    published_file(hosts.unet, folder / "exp_adapter.bin", mlp)
    expression = torch.randn(1, FLAME_DIM, generator=torch.Generator().manual_seed(9)) * 2

    nodes = comfy.pack.nodes.expression_adapter_nodes
    saved_paths = folder_paths.folder_names_and_paths["expression_adapters"]
    folder_paths.folder_names_and_paths["expression_adapters"] = ([str(folder)], saved_paths[1])
    folder_paths.filename_list_cache.pop("expression_adapters", None)
    try:
        [adapter] = nodes.LoadExpressionAdapter.execute(adapter_name="exp_adapter.bin").result
    finally:
        folder_paths.folder_names_and_paths["expression_adapters"] = saved_paths
        folder_paths.filename_list_cache.pop("expression_adapters", None)
    flame = comfy.pack.encoders.expressions.FlameExpression(expression)
    [patched] = nodes.ApplyExpressionAdapter.execute(model=hosts.model, expression_adapter=adapter, expression=flame,
                                                     strength=1.0, start_at=0.0, end_at=1.0).result
    ours = hosts.comfy(patched, cond_or_uncond=[0, 1])

    theirs = diffusers_output(hosts, folder / "exp_adapter.bin", expression)
    plain = hosts.comfy(cond_or_uncond=[0, 1])
    assert (theirs - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # the branch moves both rows
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_wrong_layer_order_is_caught_by_the_numbers(comfy, tmp_path):
    """The check above has teeth: the same file with the K/V weights of two equally wide layers (the middle
    block and up_blocks.1) swapped loads without complaint, and the output differs."""
    hosts = Hosts("SD1.5", batch=2)
    saved = published_file(hosts.unet, tmp_path / "right.bin", mlp=False)
    number = {name: n for n, name in cross_attention_numbers(hosts.unet).items()}
    mid = number["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    up = number["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"]
    swapped = dict(saved["ip_adapter"])
    for kind in ("k", "v"):
        swapped[f"{mid}.to_{kind}_ip.weight"] = saved["ip_adapter"][f"{up}.to_{kind}_ip.weight"]
        swapped[f"{up}.to_{kind}_ip.weight"] = saved["ip_adapter"][f"{mid}.to_{kind}_ip.weight"]
    torch.save({"image_proj": saved["image_proj"], "ip_adapter": swapped}, tmp_path / "swapped.bin")
    expression = torch.randn(1, FLAME_DIM, generator=torch.Generator().manual_seed(9))
    right = diffusers_output(hosts, tmp_path / "right.bin", expression)
    wrong = diffusers_output(hosts, tmp_path / "swapped.bin", expression)
    assert (right - wrong).abs().max() > 1e-3
