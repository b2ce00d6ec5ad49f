"""Face swappers for EmojiDiff's IDI step (spec A2, Stage II): ``swap(source, target) -> image``.

IDI puts the identity of a real portrait (``source``) onto the picture the base E-Adapter rendered
(``target``), keeping the target's expression. The paper used ModelScope's FaceFusion; any object
with this ``swap`` method can serve (:class:`FaceSwapper`). :class:`InsightfaceSwapper` wraps
insightface's ``inswapper_128.onnx`` (a user-supplied file; insightface's licence is non-commercial),
which reads the source identity from the buffalo_l ``w600k_r50`` embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

INSWAPPER_FILE = "inswapper_128.onnx"


class FaceSwapper(Protocol):
    def swap(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 RGB pictures -> ``target`` with ``source``'s identity (RGB, ``target``'s size)."""


class InsightfaceSwapper:
    """insightface's inswapper_128 on the largest face of each picture.

    ``analyzer``: an :class:`encoders.identity.FaceAnalyzer` with a detector and the buffalo_l
    ``w600k_r50.onnx`` recogniser (the embedding space inswapper was trained on).
    """

    def __init__(self, model_path, analyzer, provider: str = "auto"):
        path = Path(model_path)
        if path.is_dir():
            path = path / INSWAPPER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"face swapper model not found: {path}. IDI's insightface swapper needs {INSWAPPER_FILE} "
                "(insightface's inswapper, non-commercial licence); put the file there, or give another swapper")
        from insightface.model_zoo import get_model

        from encoders.identity import onnx_providers

        self.model = get_model(str(path), providers=onnx_providers(provider))
        self.analyzer = analyzer

    def _face(self, rgb: np.ndarray):
        from insightface.app.common import Face

        found = self.analyzer.analyze(rgb)[0]
        face = Face(bbox=np.asarray(found.box, np.float32), kps=np.asarray(found.kps, np.float32), det_score=found.det_score)
        face.embedding = np.asarray(found.embedding, np.float32)
        return face

    def swap(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        swapped = self.model.get(np.ascontiguousarray(target[:, :, ::-1]), self._face(target), self._face(source),
                                 paste_back=True)
        return np.ascontiguousarray(swapped[:, :, ::-1])
