"""Import optional heavy dependencies only when a feature needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> the pip package that provides it
PIP_NAMES = {
    "cv2": "opencv-python-headless",
    "insightface": "insightface",
    "onnxruntime": "onnxruntime",
    "mediapipe": "mediapipe",
    "timm": "timm",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "skimage": "scikit-image",
    "peft": "peft",
    "accelerate": "accelerate",
}


class MissingDependencyError(ImportError):
    pass


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise an error naming the pip package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = PIP_NAMES.get(module.split(".")[0], module.split(".")[0])
        raise MissingDependencyError(
            f"{feature} needs the Python package '{package}', which is not installed. "
            f"Install it into ComfyUI's Python with: python -m pip install {package}"
        ) from error
