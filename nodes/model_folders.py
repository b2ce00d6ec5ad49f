"""Register our model folders with ComfyUI so ``extra_model_paths.yaml`` can extend them."""

from __future__ import annotations

import os

import folder_paths

# folder name under ComfyUI/models -> accepted file extensions (None: ComfyUI's weight extensions)
MODEL_FOLDERS: dict[str, set[str] | None] = {
    "expression_adapters": None,
    "arc2face": None,
    "smirk": None,
    "emotion": None,
    "mediapipe": {".task"},
    "insightface": {".onnx"},
    "ipadapter": None,  # the published IP-Adapter files, where the IPAdapter Plus pack keeps them
}


def register_model_folders() -> None:
    for name, extensions in MODEL_FOLDERS.items():
        extensions = set(extensions or folder_paths.supported_pt_extensions)
        default_path = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, known = folder_paths.folder_names_and_paths[name]
            if default_path not in paths:
                paths.append(default_path)
            folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)
        else:
            folder_paths.folder_names_and_paths[name] = ([default_path], extensions)
