"""FaceCrafter's workflows: each validates against ComfyUI's own node definitions (``execution.validate_prompt``)
and uses the nodes it is about. (Every workflow also runs headless, in tests/test_workflows.py.)

The validation uses empty placeholder files for every model and input file the workflows name, so
it checks node names, input names, socket types, links and widget values, not weights.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
FACECRAFTER_WORKFLOWS = sorted((WORKFLOWS / "api").glob("facecrafter_*.json"))
MODEL_FILES = {
    "diffusion_models": "arc2face/diffusion_pytorch_model.safetensors",
    "vae": "sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
    "expression_adapters": ["facecrafter.safetensors", "exp_adapter.bin"],
    "mediapipe": "face_landmarker.task",
    "emotion": "emonet_8.pth",
}
INPUT_FILES = ("arc2face_person.jpg", "facecrafter_target.jpg", "facecrafter_driving.mp4")


@pytest.fixture(scope="module")
def placeholders(comfy, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("placeholders")
    for folder, names in MODEL_FILES.items():
        for name in [names] if isinstance(names, str) else names:
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        folder_paths.add_model_folder_path(folder, str(root / folder))
    encoder = root / "arc2face" / "encoder"
    encoder.mkdir(parents=True)
    (encoder / "config.json").write_text("{}")
    folder_paths.add_model_folder_path("arc2face", str(root / "arc2face"))
    input_dir = Path(folder_paths.get_input_directory())
    input_dir.mkdir(parents=True, exist_ok=True)
    for name in INPUT_FILES:
        if not (input_dir / name).exists():
            if name.endswith(".jpg"):
                Image.new("RGB", (64, 64)).save(input_dir / name)
            else:
                (input_dir / name).write_bytes(b"")
    return root


@pytest.mark.parametrize("api_path", FACECRAFTER_WORKFLOWS, ids=lambda p: p.name)
def test_workflow_validates_against_comfyui_node_definitions(comfy, placeholders, api_path):
    import execution

    prompt = json.loads(api_path.read_text())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    # ComfyUI calls a prompt valid when any output is; every output must be here
    assert valid and not node_errors, (error, node_errors)
    output_nodes = {key for key, node in prompt.items() if getattr(comfy.nodes.NODE_CLASS_MAPPINGS[node["class_type"]], "OUTPUT_NODE", False)}
    assert set(outputs) == output_nodes


def test_every_workflow_uses_the_facecrafter_nodes_it_is_about():
    classes = {path.name: {node["class_type"] for node in json.loads(path.read_text()).values()} for path in FACECRAFTER_WORKFLOWS}
    assert {"ExpressionAdaptersApplyFaceCrafter", "ExpressionAdaptersLoadFaceCrafter"} <= set.intersection(*classes.values())
    assert "ExpressionAdaptersFaceCrafterGuider" in classes["facecrafter_emotion.json"]
    assert "ExpressionAdaptersEmotionChart" in classes["facecrafter_emotion.json"]
    assert {"ExpressionAdaptersLandmarkPoseEditor", "ExpressionAdaptersApplyExpressionAdapter",
            "ExpressionAdaptersFlameExpression", "ExpressionAdaptersEmotion"} <= classes["facecrafter_composition.json"]
    animation = json.loads((WORKFLOWS / "api" / "facecrafter_animation.json").read_text())
    landmarks = next(node for node in animation.values() if node["class_type"] == "ExpressionAdaptersFaceLandmarks")
    assert landmarks["inputs"]["running_mode"] == "video"
    assert "ExpressionAdaptersEmotionFromImage" in classes["facecrafter_animation.json"]


def test_validation_catches_a_miswired_workflow(comfy, placeholders):
    import execution

    prompt = json.loads((WORKFLOWS / "api" / "facecrafter_emotion.json").read_text())
    prompt["13"]["inputs"]["positive"] = ["6", 0]  # an EMOTION into the guider's CONDITIONING
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert "return_type_mismatch" in json.dumps(node_errors)
