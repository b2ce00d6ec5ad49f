"""Condition encoders and the expression value types that nodes pass around.

Pure library code: never imports ComfyUI, ``nodes`` or ``training``. Heavy optional
dependencies (insightface, mediapipe, onnxruntime, timm) are imported inside the functions
that need them, through :func:`encoders.optional.require`.
"""
