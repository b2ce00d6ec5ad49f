"""Config defaults and checks of FaceCrafter's stages (``facecrafter_lmk``, ``facecrafter_emo``, ``facecrafter_joint``).

Pure Python, so :mod:`training.config` reads it without importing torch. What the paper leaves
open (spec B3) is marked CHOICE here and in ``training/stages/facecrafter.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

FACECRAFTER_STAGE_NAMES = ("facecrafter_lmk", "facecrafter_emo", "facecrafter_joint")
TOKEN_REDUCTIONS = ("mean", "sum")
PAIR_REDUCTIONS = ("sum", "mean")

FACECRAFTER_DEFAULTS = {
    # Module shapes: adapters.facecrafter.LandmarkEncoderConfig / EmotionEncoderConfig arguments
    # ({} = the spec B1 choice: 512 px landmark image -> 256 tokens x 256-d; 10-d emotion -> 4 x 256-d).
    "lmk": {},
    "emo": {},
    "layer_set": "all",  # adapters.layers.select_layers: all 16 SD1.5 cross-attention layers (CHOICE)
    # The landmark image drawn from each sample's landmarks.npy (encoders.landmark_image.render_landmark_image);
    # thickness null: 2 px at 512, scaled with the image.
    "landmark_style": {"palette": "regions", "thickness": None, "fit": "image"},
    "seed": 0,  # initialisation of new modules
    # facecrafter_joint: the files facecrafter_lmk and facecrafter_emo exported (either may hold both
    # sections; the named one is taken). null starts that module afresh (not the paper's recipe).
    "lmk_init": None,
    "emo_init": None,
    # Which other image of the target's person gives the ID embedding (training.pair_samplers):
    # lmk: other pose and expression (LMK pre-training); emo: same pose, other expression (EMO
    # pre-training); self: the target itself. null: the stage's own rule (joint: lmk, a CHOICE).
    "partner": None,
    "expression_threshold": 0.05,  # mean |blendshape difference| above which expressions differ
    "pose_degrees": 5.0,  # |dyaw| or |dpitch| above which poses differ (LMK pairs)
    "same_pose_degrees": 5.0,  # |dyaw| and |dpitch| within which poses are the same (EMO pairs)
    # A target with no partner under the rule: "self" uses the target as its ID image (FFHQ has one
    # image per person; spec B3), "drop" leaves it out.
    "unpaired": "self",
    # facecrafter_joint: intra-batch mixed conditioning and the AD loss (paper Eqs. 2-5)
    "replicas": 16,  # rows per sampled example (paper: B = 16, so a batch of 16 rows is 1 example x 16)
    "shared_noise": True,  # replicas share t and noise (CHOICE); false draws them per row
    "ad_weight": 0.0005,  # lambda_AD (paper)
    "ad_token_reduction": "mean",  # masked mean over tokens (CHOICE; "sum" = masked sum)
    "ad_pair_reduction": "sum",  # sum over pairs, as Eq. 2 is written (CHOICE; "mean" averages)
    "id_encoder_learning_rate": 1.0e-5,  # the CLIP ID encoder (CHOICE); the modules use train.learning_rate
    # Training previews use the FaceCrafter Guider's Eq. 6 with these scales (paper §4.1), not sampling.guidance_scale
    "w_id": 2.5,
    "w_lmk": 2.0,
    "w_emo": 2.0,
}
# blocks of constructor arguments, passed through to the dataclasses (which reject unknown names)
FACECRAFTER_FREE_BLOCKS = {("facecrafter", "lmk"), ("facecrafter", "emo"), ("facecrafter", "landmark_style")}
FACECRAFTER_PATH_KEYS = [("facecrafter", "lmk_init"), ("facecrafter", "emo_init")]


def check_facecrafter(config: Mapping, error) -> None:
    """Raise ``error`` (training.config.ConfigError) for impossible FaceCrafter settings."""
    cfg = config["facecrafter"]
    if cfg["partner"] not in (None, "lmk", "emo", "self"):
        raise error(f"facecrafter.partner must be lmk, emo, self or null; got {cfg['partner']!r}")
    if cfg["unpaired"] not in ("self", "drop"):
        raise error(f"facecrafter.unpaired must be self or drop; got {cfg['unpaired']!r}")
    if int(cfg["replicas"]) < 1:
        raise error(f"facecrafter.replicas must be at least 1; got {cfg['replicas']}")
    if cfg["ad_token_reduction"] not in TOKEN_REDUCTIONS:
        raise error(f"facecrafter.ad_token_reduction must be one of {TOKEN_REDUCTIONS}; got {cfg['ad_token_reduction']!r}")
    if cfg["ad_pair_reduction"] not in PAIR_REDUCTIONS:
        raise error(f"facecrafter.ad_pair_reduction must be one of {PAIR_REDUCTIONS}; got {cfg['ad_pair_reduction']!r}")
    for name in ("ad_weight", "id_encoder_learning_rate", "expression_threshold", "pose_degrees", "same_pose_degrees",
                 "w_id", "w_lmk", "w_emo"):
        if not float(cfg[name]) >= 0.0:
            raise error(f"facecrafter.{name} must be a number >= 0; got {cfg[name]}")
    if (config["stage"] == "facecrafter_joint" and config["train"]["gradient_checkpointing"]
            and float(cfg["ad_weight"]) > 0):
        raise error("facecrafter_joint reads the attention outputs of the training forward for the AD loss, which "
                    "gradient checkpointing recomputes; set train.gradient_checkpointing=false (or facecrafter.ad_weight=0)")
