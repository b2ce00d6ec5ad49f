"""The other packs' source snapshots (``../shared/packs``, see its README) for workflows that use their nodes.

A shipped workflow may use another pack's nodes (``emojidiff_sdxl_instantid``: cubiq's ComfyUI_InstantID).
Tests extract that pack's tarball into a throw-away ``custom_nodes`` folder and have ComfyUI load it with its
own loader, as a user who installed the pack has it. Nothing of a pack goes into ours.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

PACKS = Path(__file__).resolve().parents[3] / "shared" / "packs"
INSTANTID = "ComfyUI_InstantID-1ef34ef5.tar.gz"
# Each snapshot's node types (its NODE_CLASS_MAPPINGS), so a workflow tells which packs it needs without loading any
NODE_TYPES = {
    INSTANTID: {"InstantIDModelLoader", "InstantIDFaceAnalysis", "ApplyInstantID", "ApplyInstantIDAdvanced",
                "FaceKeypointsPreprocessor", "InstantIDAttentionPatch", "ApplyInstantIDControlNet"},
}


def packs_for(prompt: dict) -> list[str]:
    """The snapshots (tarball names) whose nodes an API-format workflow uses."""
    used = {node["class_type"] for node in prompt.values()}
    return sorted(tarball for tarball, types in NODE_TYPES.items() if used & types)


def other_pack_nodes(prompt: dict) -> set[str]:
    """The node types of an API-format workflow that come from another pack."""
    return {node["class_type"] for node in prompt.values()} & set().union(*NODE_TYPES.values())


def extract(tarball: str, custom_nodes: Path) -> Path:
    """The pack's folder in ``custom_nodes``, extracted from its snapshot there (once)."""
    with tarfile.open(PACKS / tarball) as archive:
        [top] = {Path(name).parts[0] for name in archive.getnames()}
        folder = Path(custom_nodes) / top
        if not folder.is_dir():
            custom_nodes.mkdir(parents=True, exist_ok=True)
            archive.extractall(custom_nodes, filter="data")
    return folder
