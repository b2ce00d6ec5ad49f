"""Config defaults and checks of EmojiDiff's stages and of ``training.idi`` (spec A2), merged into
:data:`training.config.DEFAULTS` as the ``emojidiff`` and ``idi`` sections.

Where the paper is silent the default is our choice, named so in the comment.
"""

from __future__ import annotations

EMOJIDIFF_DEFAULTS = {
    # Initialisation ([ED supp B.1]): the published FaceID file (ID projection + ID K/V + its LoRA) and
    # the image IP-Adapter file (expression projection + K/V), assembled as Load E-Adapter does ...
    "faceid": None,  # ip-adapter-faceid_sd15.bin / _sdxl.bin
    "image_adapter": None,  # ip-adapter_sd15.bin / ip-adapter_sdxl_vit-h.bin
    # ... or an E-Adapter file of ours (refined starts afresh by our choice; ICA starts from refined).
    "init": None,
    # Smoke runs and tests: random stand-in files in the published layouts, written to <output_dir>/standin_published
    # and used as `faceid` and `image_adapter` ({seed, lora_rank}).
    "standin_published": None,
    "expression_layers": "auto",  # a LAYER_SETS name; auto: all 16 on SD1.5, up_blocks.0.attentions.1 on SDXL
    "faceid_lora_scale": 1.0,  # our choice: FaceID's LoRA applied frozen at 1.0 in the UNet, as IPAdapterFaceID; 0 = off
    "prompt": "a photo of a person",  # our choice: used when a sample's metadata has no "caption"
    # Condition dropout (IP-Adapter's scheme, our choice): train.drop_expression (zero CLIP embedding), train.drop_id
    # (zero FaceID embedding), this one for the text (""), and train.drop_both for dropping all three.
    "drop_text": 0.05,
    # Stage I triplets: S = the same person with another expression, "another" = mean |blendshape difference|
    # above this (our choice; the IDI filter's Exp bound).
    "expression_field": "blendshapes",
    "expression_threshold": 0.05,
    # Random scaling on SDXL ([ED supp B.1] "following IP-Adapter"; our reading): a random-resized crop with area
    # scale in [low, high], the crop position and size in SDXL's time ids. null: off.
    "random_scale": None,
    # ICA (Stage IV): frozen teachers and the loss weights ([ED supp B.1]: R_tmax 600, w_id 0.08, w_exp 10).
    "exp_teacher": None,  # the refined E-Adapter file; null: the adapter `init` gives (smoke runs)
    "r_tmax": 600,
    "id_weight": 0.08,
    "exp_weight": 10.0,
    "arcface": None,  # buffalo_l w600k_r50.onnx, made differentiable by onnx2torch
    "tiny_arcface": None,  # smoke runs and tests: a random stand-in recogniser ({seed, dim})
    "fan": None,  # EmoNet's emonet_8.pth: its frozen FAN gives the 68 heatmaps
    "tiny_fan": None,  # smoke runs and tests: a random stand-in FAN ({seed})
    "landmark_beta": 100.0,  # soft-argmax sharpness (our choice)
    "landmark_crop_margin": 1.2,  # the 256 crop: the square around D's landmarks, this much larger (our choice)
    "wing_width": 10 / 256,
    "wing_epsilon": 2 / 256,
    "decoder_checkpointing": True,
}
EMOJIDIFF_PATH_KEYS = [("emojidiff", "faceid"), ("emojidiff", "image_adapter"), ("emojidiff", "init"),
                       ("emojidiff", "exp_teacher"), ("emojidiff", "arcface"), ("emojidiff", "fan"),
                       ("model", "text_encoder"), ("model", "text_encoder_2"), ("model", "tokenizer_2"),
                       ("idi", "adapter"), ("idi", "clip_vision"), ("idi", "swapper_model"), ("idi", "landmarker")]

IDI_DEFAULTS = {
    "adapter": None,  # the base E-Adapter file (emojidiff_base's export)
    "out": "data/idi_shards",
    "swapper": "inswapper",  # inswapper (insightface inswapper_128.onnx, the user's file)
    "swapper_model": None,
    "insightface": None,  # a buffalo_l folder (detector + w600k_r50) for the swapper's faces
    "clip_vision": None,  # CLIPVisionModelWithProjection folder: the embedding of a synthetic reference
    "tiny_clip_vision": None,  # smoke runs and tests: the demo set's random stand-in ({seed})
    "landmarker": None,  # MediaPipe face_landmarker.task (Exp and LMS of the filter; the local image)
    "synthetic_role": "reference",  # reference (spec A2's reading: R = the synthetic image) | target
    "max_exp_mean": 0.05,
    "max_lms": 0.18,
    "steps": 30,  # our choice: DPM++ 2M, 30 steps, CFG 7.5
    "guidance_scale": 7.5,
    "items_per_shard": 1000,
    "seed": 0,
}


def validate_emojidiff(config, error) -> None:
    cfg, model, train = config["emojidiff"], config["model"], config["train"]
    if (model["text_encoder"] is None) == (model["tiny_text_encoder"] is None):
        raise error("EmojiDiff stages need the base model's text encoder: set model.text_encoder (with model.tokenizer) "
                    "or model.tiny_text_encoder")
    if model["text_encoder"] is not None and model["tokenizer"] is None:
        raise error("model.text_encoder needs model.tokenizer (the base model's tokenizer folder)")
    if model["text_encoder_2"] is not None and model["tokenizer_2"] is None:
        raise error("model.text_encoder_2 needs model.tokenizer_2")
    if not cfg["init"] and not cfg["standin_published"] and not (cfg["faceid"] and cfg["image_adapter"]):
        raise error("set emojidiff.faceid and emojidiff.image_adapter (the published IP-Adapter files), or emojidiff.init")
    if config["stage"] == "emojidiff_ica" and not cfg["standin_published"] and not cfg["faceid"]:
        raise error("emojidiff_ica's identity teacher is the original FaceID adapter: set emojidiff.faceid (and image_adapter)")
    if config["stage"] == "emojidiff_ica" and (cfg["arcface"] is None) == (cfg["tiny_arcface"] is None):
        raise error("emojidiff_ica needs the recogniser of L_id: set emojidiff.arcface (w600k_r50.onnx)")
    if config["stage"] == "emojidiff_ica" and (cfg["fan"] is None) == (cfg["tiny_fan"] is None):
        raise error("emojidiff_ica needs the landmark network of L_exp: set emojidiff.fan (EmoNet's emonet_8.pth)")
    if cfg["random_scale"] is not None:
        low, high = (float(v) for v in cfg["random_scale"])
        if not 0 < low <= high <= 1:
            raise error(f"emojidiff.random_scale must be [low, high] with 0 < low <= high <= 1; got {cfg['random_scale']}")
    total = sum(float(train[k]) for k in ("drop_expression", "drop_id", "drop_both")) + float(cfg["drop_text"])
    if not 0 <= float(cfg["drop_text"]) <= 1 or total > 1:
        raise error("train.drop_expression + drop_id + drop_both + emojidiff.drop_text must not exceed 1")
    if not 0 <= int(cfg["r_tmax"]) < 1000:
        raise error(f"emojidiff.r_tmax is a timestep index 0..999; got {cfg['r_tmax']}")
    if config["idi"]["synthetic_role"] not in ("reference", "target"):
        raise error(f"idi.synthetic_role must be reference or target; got {config['idi']['synthetic_role']!r}")
