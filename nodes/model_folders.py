"""Register our model folders with ComfyUI so ``extra_model_paths.yaml`` can extend them."""

from __future__ import annotations

import os
import re

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


def model_choices(folder: str, default: str, keep=None) -> list[str]:
    """The files of a model folder (those ``keep(full_path)`` accepts, when given), and the published file name
    always, last when it is absent (a new node shows a file that is there): so a workflow saved with it passes
    ComfyUI's list check (newer versions check V3 combos too) and reaches the loader, whose error says where
    to get the file and where to put it."""
    names = folder_paths.get_filename_list(folder)
    if keep is not None:
        paths = {name: folder_paths.get_full_path(folder, name) for name in names}
        names = [name for name in names if paths[name] is not None and keep(paths[name])]
    return names if default in names else [*names, default]


def check_name_inside(name: str, what: str) -> str:
    """``name`` when it names a place inside a folder: not absolute, no drive, no ``..`` component, no NUL.

    The name is judged, not the resolved path, so model folders that are links to other disks keep working."""
    parts = re.split(r"[\\/]", name)
    if not name or "\0" in name or os.path.isabs(name) or name[0] in "/\\" or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise ValueError(f"{what}: {name[:60]!r} is not a name inside its model folder (absolute paths and '..' are refused)")
    return name


def model_file(folder: str, name: str, source: str) -> str:
    """Full path of ``name`` in the registered ``folder``; else an error naming the folders, the file and the source."""
    check_name_inside(name, f"the '{folder}' model file")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or f"ComfyUI/models/{folder}"
        where = os.path.join(folder_paths.get_folder_paths(folder)[0], name) if folder_paths.get_folder_paths(folder) else name
        raise FileNotFoundError(f"model file '{name}' not found in the '{folder}' model folder ({searched}). "
                                f"Download it from {source} and save it as {where}.")
    return path


def unreadable_file_error(folder: str, name: str) -> None:
    """Raise the :class:`~adapters.checkpoints.WeightFileError` of ``name`` when it is a weights file in ``folder``
    that cannot be read (the loaders leave such files out of their lists); return otherwise."""
    from ..adapters.checkpoints import SAFETENSORS_SUFFIXES, safetensors_keys

    try:
        path = folder_paths.get_full_path(folder, check_name_inside(name, folder))
    except ValueError:
        return
    if path is None or not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return
    try:
        safetensors_keys(path)
    except OSError:
        return
