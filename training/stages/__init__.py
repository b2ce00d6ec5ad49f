"""Training stages, one module per method, and their registry (the names configs give as ``stage``).

- :mod:`.base`: what a stage is and what every stage shares;
- :mod:`.arc2face`: the Expression Adapter and its Reference Adapter LoRA (paper §3.4);
- :mod:`.emojidiff`: EmojiDiff's E-Adapter stages (spec A2);
- :mod:`.facecrafter`: FaceCrafter's stages (spec B3).

The registry is built here, from the modules, and no module imports it back.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..models import HostModels
from .arc2face import ExpressionAdapterStage, ReferenceLoraStage
from .base import DenoisingStage, Stage
from .emojidiff import EmojiDiffBaseStage, EmojiDiffICAStage, EmojiDiffRefinedStage
from .facecrafter import FaceCrafterEmoStage, FaceCrafterJointStage, FaceCrafterLmkStage, FaceCrafterStage

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (
    ExpressionAdapterStage, ReferenceLoraStage,
    EmojiDiffBaseStage, EmojiDiffRefinedStage, EmojiDiffICAStage,
    FaceCrafterLmkStage, FaceCrafterEmoStage, FaceCrafterJointStage,
)}


def build_stage(config: Mapping, host: HostModels, device) -> Stage:
    try:
        stage_class = STAGES[config["stage"]]
    except KeyError:
        raise ValueError(f"stage {config['stage']!r} is not available; stages: {', '.join(STAGES)}") from None
    return stage_class(config, host, device)


__all__ = ["STAGES", "DenoisingStage", "EmojiDiffBaseStage", "EmojiDiffICAStage", "EmojiDiffRefinedStage",
           "ExpressionAdapterStage", "FaceCrafterEmoStage", "FaceCrafterJointStage", "FaceCrafterLmkStage",
           "FaceCrafterStage", "ReferenceLoraStage", "Stage", "build_stage"]
