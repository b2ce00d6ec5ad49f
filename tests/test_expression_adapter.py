"""The Expression Adapter reads the published exp_adapter.bin layout and writes it as safetensors."""

import pytest
import torch
from torch import nn

from adapters.checkpoints import AdapterFileError, WeightFileError, read_state_dict
from adapters.expression_adapter import ExpressionAdapter
from adapters.layers import SD15, SDXL, cross_attention_layers
from adapters.projections import MLPProjection
from support.random_init import init_devices
from support.tiny_unets import random_expression_adapter, tiny_width

TOKEN_DIM = 32


def official_modules(mlp: bool, token_dim=TOKEN_DIM, width=lambda layer: tiny_width(SD15, layer)):
    """Stand-alone torch modules named as in the published file, independent of our classes."""
    torch.manual_seed(3)
    if mlp:
        image_proj = nn.ModuleDict({"proj": nn.Sequential(nn.Linear(55, 110), nn.GELU(), nn.Linear(110, 4 * token_dim)),
                                    "norm": nn.LayerNorm(token_dim)})
    else:
        image_proj = nn.ModuleDict({"proj": nn.Linear(55, 4 * token_dim), "norm": nn.LayerNorm(token_dim)})
    for parameter in image_proj["norm"].parameters():
        nn.init.normal_(parameter)
    layers = {}
    for layer in cross_attention_layers(SD15):
        for name in ("to_k_ip", "to_v_ip"):
            layers[f"{layer.checkpoint_number}.{name}"] = nn.Linear(token_dim, width(layer), bias=False)
    return image_proj, layers


def write_exp_adapter_bin(path, image_proj, layers):
    ip_adapter = {f"{name}.weight": linear.weight.detach().clone() for name, linear in layers.items()}
    torch.save({"image_proj": image_proj.state_dict(), "ip_adapter": ip_adapter}, path)


def reference_tokens(image_proj, expression, token_dim=TOKEN_DIM):
    return image_proj["norm"](image_proj["proj"](expression).reshape(-1, 4, token_dim))


@pytest.mark.parametrize("mlp", [False, True], ids=["linear_projection", "mlp_projection"])
def test_published_layout_loads_and_computes_the_same(tmp_path, mlp):
    image_proj, layers = official_modules(mlp)
    path = tmp_path / "exp_adapter.bin"
    write_exp_adapter_bin(path, image_proj, layers)

    adapter = ExpressionAdapter.from_file(path)
    assert adapter.layout is SD15 and len(adapter.layers) == 16 and adapter.num_tokens == 4
    expression = torch.randn(3, 55)
    with torch.no_grad():
        tokens = adapter.expression_tokens(expression)
        torch.testing.assert_close(tokens, reference_tokens(image_proj, expression))
        for layer in adapter.layers:
            key, value = adapter.branch(layer).keys_values(tokens)
            torch.testing.assert_close(key, layers[f"{layer.checkpoint_number}.to_k_ip"](tokens))
            torch.testing.assert_close(value, layers[f"{layer.checkpoint_number}.to_v_ip"](tokens))

    saved = tmp_path / "exp_adapter.safetensors"
    adapter.save(saved)
    keys = set(read_state_dict(saved))
    assert "ip_adapter.1.to_k_ip.weight" in keys and "ip_adapter.31.to_v_ip.weight" in keys
    assert ("image_proj.proj.0.weight" in keys) == mlp
    reloaded = ExpressionAdapter.from_file(saved)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.expression_tokens(expression), tokens)
        for name, tensor in adapter.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_loaded_weights_are_the_files_without_random_init(tmp_path, monkeypatch, dtype):
    """As published (float16) or as we save (float32): the parameters are the file's tensors, as float32 on the CPU
    (what loading into a float32 module always gave), none left on the meta device; no random init is computed."""
    image_proj, layers = official_modules(mlp=True)
    file_state = {f"image_proj.{k}": v.to(dtype) for k, v in image_proj.state_dict().items()}
    file_state |= {f"ip_adapter.{name}.weight": linear.weight.detach().to(dtype) for name, linear in layers.items()}
    path = tmp_path / "exp_adapter.bin"
    torch.save(file_state, path)
    seen = init_devices(monkeypatch)
    adapter = ExpressionAdapter.from_file(path)
    assert seen and set(seen) == {"meta"}  # built as shapes only
    parameters = dict(adapter.named_parameters())
    assert set(parameters) == set(file_state) and not list(adapter.buffers())
    for name, parameter in parameters.items():
        assert parameter.device == torch.device("cpu") and parameter.dtype == torch.float32 and parameter.requires_grad, name
        assert torch.equal(parameter.detach(), file_state[name].float()), name


def test_adapters_built_for_training_still_get_random_init():
    """Only the loaders skip initialisation: a module built directly (training's fresh adapters) is random, on the CPU."""
    widths = {layer.checkpoint_number: tiny_width(SD15, layer) for layer in cross_attention_layers(SD15)}
    first, second = (ExpressionAdapter(MLPProjection(55, TOKEN_DIM, 4), SD15, widths) for _ in range(2))
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert a.device == torch.device("cpu") and a.dtype == torch.float32, name
        if name.endswith("weight") and "norm" not in name:
            assert a.std() > 0 and not torch.equal(a, b), name


def test_real_sd15_sizes_are_recognised(tmp_path):
    """768-d tokens and widths 320/640/1280, as in the published file."""
    real_width = {0: 320, 1: 640, 2: 1280}

    def width(layer):
        block, index = layer.diffusers_name.split(".")[:2]
        if block == "mid_block":
            return 1280
        return real_width[int(index)] if block == "down_blocks" else real_width[3 - int(index)]

    image_proj, layers = official_modules(mlp=True, token_dim=768, width=width)
    write_exp_adapter_bin(tmp_path / "exp_adapter.bin", image_proj, layers)
    adapter = ExpressionAdapter.from_file(tmp_path / "exp_adapter.bin")
    assert adapter.token_dim == 768 and adapter.layout is SD15
    assert [adapter.branch(layer).width for layer in adapter.layers] == [width(layer) for layer in cross_attention_layers(SD15)]


def test_unconditional_tokens_are_the_projected_zero_expression():
    adapter = random_expression_adapter()
    with torch.no_grad():
        uncond = adapter.unconditional_tokens()
        torch.testing.assert_close(uncond, adapter.image_proj(torch.zeros(1, 55)))
    assert uncond.shape == (1, 4, TOKEN_DIM) and uncond.abs().sum() > 0


def test_bad_expressions_are_refused():
    adapter = random_expression_adapter()
    with pytest.raises(ValueError, match=r"shape \(batch, 55\)"):
        adapter.expression_tokens(torch.zeros(1, 52))
    bad = torch.zeros(2, 55)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adapter.expression_tokens(bad)


def test_missing_misshapen_or_unexpected_keys_are_named_with_the_file_and_adapter(tmp_path):
    image_proj, layers = official_modules(mlp=False)
    del layers["17.to_v_ip"]
    path = tmp_path / "exp_adapter.bin"
    write_exp_adapter_bin(path, image_proj, layers)
    with pytest.raises(AdapterFileError) as error:
        ExpressionAdapter.from_file(path)
    message = str(error.value)
    assert "exp_adapter.bin" in message and "Arc2Face Expression Adapter" in message and "Arc2Face (SD1.5)" in message
    assert "missing keys: ip_adapter.17.to_v_ip.weight" in message

    image_proj, layers = official_modules(mlp=False)
    layers["17.to_v_ip"] = nn.Linear(TOKEN_DIM, 3, bias=False)
    write_exp_adapter_bin(path, image_proj, layers)
    width = tiny_width(SD15, next(layer for layer in cross_attention_layers(SD15) if layer.checkpoint_number == 17))
    with pytest.raises(AdapterFileError, match=rf"exp_adapter.bin is not a valid Arc2Face Expression Adapter for Arc2Face "
                                               rf"\(SD1.5\): shape mismatch: ip_adapter.17.to_v_ip.weight: file \(3, {TOKEN_DIM}\) "
                                               rf"vs expected \({width}, {TOKEN_DIM}\)"):
        ExpressionAdapter.from_file(path)
    image_proj, layers = official_modules(mlp=False)
    layers["17.to_q_ip"] = nn.Linear(TOKEN_DIM, 3, bias=False)
    write_exp_adapter_bin(path, image_proj, layers)
    with pytest.raises(AdapterFileError, match=r"unexpected keys: ip_adapter.17.to_q_ip.weight"):
        ExpressionAdapter.from_file(path)


def test_a_faceid_style_file_is_not_an_expression_adapter(tmp_path):
    adapter = random_expression_adapter()
    state = adapter.state_dict()
    state["image_proj.proj.weight"] = torch.zeros(4 * TOKEN_DIM, 512)  # a 512-d ArcFace input
    path = tmp_path / "faceid.bin"
    torch.save({"image_proj": {k[11:]: v for k, v in state.items() if k.startswith("image_proj.")},
                "ip_adapter": {k[11:]: v for k, v in state.items() if k.startswith("ip_adapter.")}}, path)
    with pytest.raises(AdapterFileError, match="takes 512 inputs, not 55 FLAME parameters"):
        ExpressionAdapter.from_file(path)


def test_files_without_adapter_sections_or_with_code_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(2)}, path)
    with pytest.raises(AdapterFileError, match="expected 'image_proj' and 'ip_adapter' sections"):
        ExpressionAdapter.from_file(path)

    import argparse

    pickled = tmp_path / "exp_adapter.bin"
    torch.save({"image_proj": argparse.Namespace(code="not data")}, pickled)
    with pytest.raises(WeightFileError, match=r"cannot read exp_adapter.bin as weights: it asks to run code when "
                                              r"loaded, which is refused.*argparse.Namespace"):
        ExpressionAdapter.from_file(pickled)
    with pytest.raises(ValueError, match="unsupported weight file type"):
        (tmp_path / "adapter.onnx").write_bytes(b"0")
        ExpressionAdapter.from_file(tmp_path / "adapter.onnx")


def test_sdxl_shaped_adapter_round_trips(tmp_path):
    adapter = random_expression_adapter("SDXL", mlp=True)
    adapter.save(tmp_path / "sdxl.safetensors")
    reloaded = ExpressionAdapter.from_file(tmp_path / "sdxl.safetensors")
    assert reloaded.layout is SDXL and len(reloaded.layers) == 70
