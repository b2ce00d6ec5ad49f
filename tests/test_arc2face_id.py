"""Arc2Face ID encoder: tiny CLIPTextModels saved in the published folder layout (both key layouts),
the ``id`` token replacement checked numerically, and the errors for files that do not fit."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch
import transformers

from encoders.arc2face_id import (
    ID_PROMPT,
    Arc2FaceIDEncoder,
    EncoderFilesError,
    convert_layout,
    load_clip_tokenizer,
    load_text_encoder,
)
from training.tiny import PROMPT_WORDS, write_tiny_tokenizer

HIDDEN = 32
WORDS = PROMPT_WORDS
SD1_TOKENIZER = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")) / "comfy" / "sd1_tokenizer"


def tiny_text_model(vocab_size: int, bos: int, eos: int, hidden: int = HIDDEN, seed: int = 0):
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    config.architectures = ["CLIPTextModel"]
    torch.manual_seed(seed)
    return transformers.CLIPTextModel(config).eval()


def plain_keys(model) -> dict:
    """The state dict in transformers 5's layout (no ``text_model.`` level), whatever is installed."""
    return {key.removeprefix("text_model."): value.clone() for key, value in model.state_dict().items()}


def save_published(model, folder: Path, layout: str) -> Path:
    """As on the hub: config.json + pytorch_model.bin saved by transformers 4 (``text_model.*``,
    with the position_ids buffer it used to save), or a transformers-5 model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    state = plain_keys(model)
    if layout == "transformers4":
        state = {"text_model." + key: value for key, value in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        torch.save(state, folder / "pytorch_model.bin")
    else:
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_clip_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def original(tokenizer):
    return tiny_text_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def published(tmp_path_factory, original):
    root = tmp_path_factory.mktemp("encoders")
    return {layout: save_published(original, root / layout, layout) for layout in ("transformers4", "transformers5")}


@pytest.fixture(scope="module")
def encoder(published, tokenizer):
    return Arc2FaceIDEncoder(load_text_encoder(published["transformers4"]), tokenizer)


def test_tiny_tokenizer_tokenises_the_prompt_as_sd15_does(tokenizer):
    ids = tokenizer(ID_PROMPT).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>"] + [w + "</w>" for w in WORDS] + ["<|endoftext|>"]


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_published_layouts_load_strictly_with_the_same_weights(published, original, layout):
    model = load_text_encoder(published[layout])
    loaded, expected = plain_keys(model), plain_keys(original)
    assert loaded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0, msg=key)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.arange(77)[None] % original.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state, rtol=0, atol=0
        )


def test_half_precision_file_loads_in_the_asked_dtype(tmp_path, original):
    folder = tmp_path / "fp16"
    save_published(copy.deepcopy(original).half(), folder, "transformers5")
    model = load_text_encoder(folder, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(plain_keys(model)["final_layer_norm.weight"], plain_keys(original)["final_layer_norm.weight"], rtol=1e-3, atol=1e-3)


def test_convert_layout_both_ways():
    plain = {"embeddings.token_embedding.weight": torch.ones(1), "final_layer_norm.bias": torch.zeros(1)}
    legacy = {"text_model." + k: v for k, v in plain.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(3)
    assert convert_layout(legacy, legacy=False).keys() == plain.keys()
    assert convert_layout(plain, legacy=True).keys() == {k for k in legacy if not k.endswith("position_ids")}
    assert convert_layout(plain, legacy=False).keys() == plain.keys()
    with pytest.raises(EncoderFilesError, match="mix keys"):
        convert_layout({**plain, "text_model.x": torch.ones(1)}, legacy=False)


def test_encode_shapes_and_batch_rows(encoder):
    torch.manual_seed(1)
    vectors = torch.randn(3, 24)
    batch = encoder.encode(vectors)
    assert batch.shape == (3, 77, HIDDEN) and batch.dtype == torch.float32
    for row in range(3):
        torch.testing.assert_close(batch[row], encoder.encode(vectors[row])[0], rtol=1e-5, atol=1e-5)
    assert encoder.id_position == 4  # <start> photo of a id


def test_id_vector_reaches_only_causal_positions_from_the_id_token(encoder):
    torch.manual_seed(2)
    first, second = encoder.encode(torch.randn(2, 24))
    position = encoder.id_position
    torch.testing.assert_close(first[:position], second[:position], rtol=0, atol=1e-6)
    changed = (first - second).abs().amax(dim=-1)
    assert bool((changed[position:] > 1e-4).all()), changed


def test_id_token_embedding_is_the_normalised_zero_padded_vector(encoder):
    """If the ``id`` row of the embedding table already is the padded vector, replacing it changes nothing."""
    torch.manual_seed(3)
    vector = torch.randn(24)
    table = encoder.text_model.get_input_embeddings().weight
    saved = table[encoder.id_token].clone()
    try:
        with torch.no_grad():
            table[encoder.id_token] = torch.cat([vector / vector.norm(), torch.zeros(HIDDEN - 24)])
            plain = encoder.text_model(input_ids=encoder.prompt_ids).last_hidden_state[0]
        torch.testing.assert_close(encoder.encode(vector)[0], plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoder.encode(5.0 * vector)[0], plain, rtol=1e-5, atol=1e-5)
        padded_by_hand = torch.cat([vector, torch.zeros(HIDDEN - 24)])
        torch.testing.assert_close(encoder.encode(padded_by_hand)[0], plain, rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            table[encoder.id_token] = saved


def test_negative_is_the_empty_prompt_and_ignores_the_identity(encoder, tokenizer):
    before = encoder.encode_negative(2)
    encoder.encode(torch.randn(1, 24))
    after = encoder.encode_negative(2)
    assert before.shape == (2, 77, HIDDEN)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder.text_model(input_ids=empty).last_hidden_state[0]
    torch.testing.assert_close(after[1], expected, rtol=1e-6, atol=1e-6)
    assert (encoder.encode(torch.randn(1, 24))[0] - after[0]).abs().max() > 1e-3


def test_bad_embeddings_are_errors(encoder):
    with pytest.raises(ValueError, match=r"40-d but the encoder's token embeddings are 32-d"):
        encoder.encode(torch.randn(1, 40))
    rows = torch.randn(3, 24)
    rows[1, 0] = float("nan")
    rows[2] = 0
    with pytest.raises(ValueError, match=r"zero or not finite in batch rows 2, 3 \(counting from 1\)"):
        encoder.encode(rows)


def test_lower_precision_load(published, tokenizer, encoder):
    half = Arc2FaceIDEncoder(load_text_encoder(published["transformers5"], dtype=torch.bfloat16), tokenizer)
    assert next(half.text_model.parameters()).dtype == torch.bfloat16
    vector = torch.randn(1, 24)
    out = half.encode(vector)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, encoder.encode(vector), rtol=0.05, atol=0.1)


def test_missing_or_mismatched_files_name_the_folder(tmp_path, published, original, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderFilesError, match=rf"{empty} has no config.json; expected config.json and pytorch_model.bin"):
        load_text_encoder(empty)
    original.config.save_pretrained(str(empty))
    with pytest.raises(EncoderFilesError, match=rf"{empty} has no weights: expected config.json and pytorch_model.bin or model.safetensors"):
        load_text_encoder(empty)

    broken = tmp_path / "broken"
    save_published(original, broken, "transformers4")
    state = torch.load(broken / "pytorch_model.bin", weights_only=True)
    del state["text_model.final_layer_norm.weight"]
    torch.save(state, broken / "pytorch_model.bin")
    with pytest.raises(EncoderFilesError, match=r"missing keys: final_layer_norm.weight.*FoivosPar/Arc2Face") as error:
        load_text_encoder(broken)
    assert str(broken) in str(error.value)

    wider = tmp_path / "wider"
    save_published(original, wider, "transformers5")
    config = json.loads((wider / "config.json").read_text())
    config["hidden_size"] = 48
    (wider / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderFilesError, match=r"wrong shape keys: .*\(model \(\d+, 48\)\)"):
        load_text_encoder(wider)

    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    (not_clip / "model.safetensors").write_bytes(b"")
    with pytest.raises(EncoderFilesError, match=r"not_clip.config.json is not a CLIP text-encoder config .*'t5'"):
        load_text_encoder(not_clip)
    damaged = tmp_path / "damaged"
    original.config.save_pretrained(str(damaged))
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EncoderFilesError, match=r"could not read the weights .*damaged.model.safetensors"):
        load_text_encoder(damaged)

    with pytest.raises(EncoderFilesError, match=r"tokenizer folder .* is missing merges.txt"):
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "vocab.json").write_text("{}")
        load_clip_tokenizer(tmp_path / "tok")


@pytest.mark.skipif(not (SD1_TOKENIZER / "vocab.json").is_file(), reason=f"no ComfyUI SD1 tokenizer at {SD1_TOKENIZER}")
def test_with_comfyui_sd1_tokenizer(tmp_path):
    tokenizer = load_clip_tokenizer(SD1_TOKENIZER)
    model = tiny_text_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, hidden=16)
    encoder = Arc2FaceIDEncoder(load_text_encoder(save_published(model, tmp_path / "enc", "transformers4")), tokenizer)
    # ComfyUI's tokenizer_config says model_max_length 8192; the prompt must still be 77 tokens
    assert encoder.prompt_ids.shape == (1, 77)
    assert tokenizer.convert_ids_to_tokens(encoder.prompt_ids[0, :7].tolist()) == (
        ["<|startoftext|>"] + [w + "</w>" for w in WORDS] + ["<|endoftext|>"]
    )
    assert encoder.id_position == 4
    assert set(encoder.prompt_ids[0, 6:].tolist()) == {tokenizer.eos_token_id}
    assert encoder.encode(torch.randn(2, 16)).shape == (2, 77, 16)
