"""SMIRK, EmoNet and the Arc2Face ID encoder live in ComfyUI ModelPatchers, loaded by ComfyUI's model
management (so it counts and offloads them); the ID encoder follows the text-encoder dtype flags.

Stand-in (tiny, random) models in the published file layouts; needs a real ComfyUI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfyui
TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    """smirk/SMIRK_em1.pt, emotion/emonet_8.pth and arc2face/encoder/ (tiny, random weights)."""
    import transformers

    lib = comfy.pack.encoders
    root = tmp_path_factory.mktemp("helper_models")
    torch.manual_seed(0)
    smirk = lib.smirk.SmirkExpressionEncoder()
    (root / "smirk").mkdir()
    torch.save({lib.smirk.SMIRK_PREFIX + key: value for key, value in smirk.state_dict().items()}, root / "smirk" / "SMIRK_em1.pt")
    emonet = lib.emotion.EmoNet(n_expression=8, stem=8, width=16, fc_hidden=16)
    (root / "emotion").mkdir()
    torch.save(emonet.state_dict(), root / "emotion" / "emonet_8.pth")
    # ComfyUI's SD1 tokenizer has 49408 tokens, 49406/49407 the start and end tokens
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=49407)
    transformers.CLIPTextModel(config).save_pretrained(str(root / "arc2face" / "encoder"))
    return root


@pytest.fixture
def folders(models, monkeypatch):
    import folder_paths

    for name in ("smirk", "emotion", "arc2face"):
        extensions = folder_paths.folder_names_and_paths[name][1]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(models / name)], extensions))
        folder_paths.filename_list_cache.pop(name, None)


def loaded_patchers():
    from comfy import model_management

    return [loaded.model for loaded in model_management.current_loaded_models]


def face_landmarks(lib):
    npz = TESTDATA / "t1_faces.npz"
    if not npz.is_file():
        pytest.skip(f"{npz} not available")
    faces = torch.from_numpy(np.load(npz)["lm478"][:1]).float()
    return lib.expressions.Landmarks(faces, image_size=(886, 1280))


def test_smirk_and_emonet_are_loaded_and_offloaded_by_comfyui(comfy, folders):
    from comfy import model_management
    from comfy.model_patcher import ModelPatcher

    nodes, lib = comfy.pack.nodes.expression_encoder_nodes, comfy.pack.encoders
    image = torch.rand(1, 886, 1280, 3, generator=torch.Generator().manual_seed(0))
    landmarks = face_landmarks(lib)
    [smirk] = nodes.LoadSmirkEncoder.execute(model_name="SMIRK_em1.pt").args
    [emonet] = nodes.LoadEmoNet.execute(model_name="emonet_8.pth").args
    for helper in (smirk, emonet):
        assert isinstance(helper.patcher, ModelPatcher)
        assert helper.patcher.load_device == model_management.text_encoder_device()
        assert helper.patcher.offload_device == model_management.text_encoder_offload_device()
    model_management.unload_all_models()
    expression, _ = nodes.SmirkExpression.execute(image=image, smirk_model=smirk, channel_order="RGB", face_index=0,
                                                  landmarks=landmarks).args
    assert smirk.patcher in loaded_patchers()  # ComfyUI counts it
    expected, _ = lib.smirk.encode_expression(smirk.model, image, landmarks, channel_order="RGB")
    torch.testing.assert_close(expression.values, expected.values)
    emotion, _ = nodes.EmotionFromImage.execute(image=image, emonet=emonet, crop_scale=1.2, landmarks=landmarks).args
    assert emonet.patcher in loaded_patchers() and len(emotion) == 1
    model_management.unload_all_models()  # and can offload them
    assert smirk.patcher not in loaded_patchers() and emonet.patcher not in loaded_patchers()


@pytest.mark.parametrize("flag, dtype", [(None, torch.float32), ("fp16_text_enc", torch.float16),
                                         ("bf16_text_enc", torch.bfloat16), ("fp32_text_enc", torch.float32)])
def test_the_id_encoder_follows_the_text_encoder_dtype_flags_and_comfyui_loads_it(comfy, folders, monkeypatch, flag, dtype):
    from comfy import model_management

    if flag is not None:
        monkeypatch.setattr(model_management.args, flag, True)
    nodes = comfy.pack.nodes.identity_nodes
    [encoder] = nodes.LoadArc2FaceIDEncoder.execute(encoder_name="encoder", download_missing=False).args
    expected = dtype if flag is not None or model_management.is_device_cpu(encoder.load_device) else torch.float16
    assert next(encoder.patcher.model.parameters()).dtype == expected
    assert encoder.patcher.load_device == model_management.text_encoder_device()
    assert encoder.patcher.offload_device == model_management.text_encoder_offload_device()
    model_management.unload_all_models()
    positive, negative = nodes.Arc2FaceIDConditioning.execute(id_encoder=encoder, embeddings=torch.randn(2, 16)).args
    assert encoder.patcher in loaded_patchers()
    assert positive[0][0].shape == (2, 77, 32) and negative[0][0].shape == (2, 77, 32)
    assert torch.isfinite(positive[0][0]).all()
