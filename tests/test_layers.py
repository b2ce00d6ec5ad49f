import pytest

from adapters.layers import (
    SD15,
    SDXL,
    attention_layers,
    cross_attention_layers,
    layout_for_cross_attention_keys,
    select_layers,
    self_attention_layers,
)
from support.tiny_unets import diffusers_unet


def test_layer_counts():
    assert (len(self_attention_layers(SD15)), len(cross_attention_layers(SD15))) == (16, 16)
    assert (len(self_attention_layers(SDXL)), len(cross_attention_layers(SDXL))) == (70, 70)


def test_sd15_checkpoint_numbers_are_the_published_ones():
    assert [layer.checkpoint_number for layer in cross_attention_layers(SD15)] == list(range(1, 32, 2))


def test_comfy_keys_include_the_middle_block_as_middle_0():
    sd15_keys = [layer.comfy_key for layer in cross_attention_layers(SD15)]
    assert sd15_keys[-1] == ("middle", 0, 0)
    assert sd15_keys[:6] == [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)]
    assert sd15_keys[6:15] == [("output", i, 0) for i in range(3, 12)]
    sdxl_keys = {layer.comfy_key for layer in cross_attention_layers(SDXL)}
    assert {("middle", 0, i) for i in range(10)} <= sdxl_keys
    assert ("middle", 1, 0) not in sdxl_keys
    assert {key[:2] for key in sdxl_keys} == {("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
                                              *{("output", i) for i in range(6)}}


@pytest.mark.parametrize("family,layout", [("SD1.5", SD15), ("SDXL", SDXL)])
def test_catalogue_matches_diffusers_processor_order(family, layout):
    """The IP-Adapter number of a layer is its position among diffusers' attention processors."""
    unet = diffusers_unet(family)
    processor_modules = [name.removesuffix(".processor") for name in unet.attn_processors]
    assert processor_modules == [layer.diffusers_name for layer in attention_layers(layout)]
    for layer in attention_layers(layout):
        assert processor_modules.index(layer.diffusers_name) == layer.checkpoint_number


def test_named_layer_sets():
    expression_layers = select_layers(SDXL, "emojidiff_expression_sdxl")
    assert len(expression_layers) == 10
    assert {layer.comfy_key for layer in expression_layers} == {("output", 1, i) for i in range(10)}
    assert len(select_layers(SD15, "all")) == 16
    with pytest.raises(ValueError, match="unknown layer set"):
        select_layers(SD15, "faces")


def test_layout_recognised_from_comfy_keys():
    assert layout_for_cross_attention_keys(layer.comfy_key for layer in cross_attention_layers(SDXL)) is SDXL
    with pytest.raises(ValueError, match="neither SD1.5"):
        layout_for_cross_attention_keys([("input", 1, 0)])
