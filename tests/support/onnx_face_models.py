"""Tiny ONNX face models exported from torch, so insightface + onnxruntime run for real without weights.

- :func:`export_recognizer`: a tiny conv net (112x112x3 -> 512), loaded by insightface as ArcFace.
- :func:`export_detector`: a stand-in with SCRFD's nine outputs (3 strides x scores, box distances,
  keypoint offsets) whose values place given faces (the real t1.jpg faces from shared/testdata) on
  anchors, so insightface's own SCRFD decoding, letterbox scaling and NMS run on it. It "finds"
  those faces in any picture; with ``blank_sees_nothing`` it finds none in an all-black picture.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"
DET_SIZE = 640


def insightface_images() -> Path:
    """insightface's shipped pictures (t1.jpg with 6 faces, Tom_Hanks_54745.png)."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images"


def load_t1():
    """t1.jpg as RGB uint8 and the boxes + 5 keypoints of three of its faces; None where the test data is absent."""
    import cv2

    if not (TESTDATA / "t1_faces.npz").is_file():
        return None
    faces = np.load(TESTDATA / "t1_faces.npz")
    bgr = cv2.imread(str(insightface_images() / "t1.jpg"))
    return bgr[:, :, ::-1].copy(), faces["boxes"].astype(np.float32), faces["kps5"].astype(np.float32)


class TinyRecognizer(torch.nn.Module):
    def __init__(self, nan: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8 * 14 * 14, 512)
        self.nan = nan

    def forward(self, x):
        out = self.fc(torch.relu(self.conv(x)).flatten(1))
        if self.nan:
            # inputs are in [-1, 1], so this is the square root of a negative number
            out = out * torch.sqrt(x.mean() - 5.0)
        return out


class ConstantOutputs(torch.nn.Module):
    """Returns fixed tensors; the first ``gated`` are zeroed when every input value is below -0.99
    (SCRFD feeds ``(pixel - 127.5) / 128``, so a black picture is -0.996 everywhere)."""

    def __init__(self, outputs, gated: int = 0):
        super().__init__()
        for index, value in enumerate(outputs):
            self.register_buffer(f"out{index}", torch.as_tensor(value, dtype=torch.float32))
        self.count = len(outputs)
        self.gated = gated

    def forward(self, x):
        zero = x.mean() * 0.0
        seen = (x.amax() > -0.99).float()
        return tuple(
            getattr(self, f"out{index}") * (seen if index < self.gated else 1.0) + zero for index in range(self.count)
        )


def face_crop(rgb: np.ndarray, box, size: int = 256) -> np.ndarray:
    """A square around ``box`` (2.2 times its larger side), resized to ``size``: a face large enough for MediaPipe."""
    from PIL import Image

    x0, y0, x1, y1 = box
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, 2.2 * max(x1 - x0, y1 - y0)
    crop = Image.fromarray(rgb).crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def _export(module, example, path, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=["input.1"], output_names=names,
            dynamic_axes={"input.1": {0: "batch"}} if example.shape[-1] == 112 else None, dynamo=False,
        )
    return path


def export_recognizer(path, seed=0, nan=False):
    torch.manual_seed(seed)
    module = TinyRecognizer(nan=nan)
    _export(module, torch.zeros(1, 3, 112, 112), path, ["embedding"])
    return module


def export_detector(path, boxes, kps, scores, image_hw, det_size=DET_SIZE, blank_sees_nothing=False):
    """SCRFD-shaped outputs that decode to ``boxes``/``kps`` (image pixels) after insightface's
    letterboxing of an ``image_hw`` picture to ``det_size``."""
    height, width = image_hw
    scale = det_size / width if height / width <= 1 else det_size / height
    outputs = {"scores": [], "boxes": [], "kps": []}
    for stride in (8, 16, 32):
        cells = det_size // stride
        count = cells * cells * 2
        outputs["scores"].append(np.zeros((count, 1), np.float32))
        outputs["boxes"].append(np.ones((count, 4), np.float32))
        outputs["kps"].append(np.zeros((count, 10), np.float32))
    stride = 8
    for box, points, score in zip(boxes, kps, scores):
        box_det, points_det = np.asarray(box) * scale, np.asarray(points) * scale
        cx, cy = int((box_det[0] + box_det[2]) / 2 / stride), int((box_det[1] + box_det[3]) / 2 / stride)
        anchor = (cy * (det_size // stride) + cx) * 2
        centre = np.array([cx * stride, cy * stride], np.float32)
        outputs["scores"][0][anchor] = score
        outputs["boxes"][0][anchor] = np.r_[centre - box_det[:2], box_det[2:] - centre] / stride
        outputs["kps"][0][anchor] = ((points_det - centre) / stride).reshape(-1)
    module = ConstantOutputs(outputs["scores"] + outputs["boxes"] + outputs["kps"], gated=3 if blank_sees_nothing else 0)
    return _export(module, torch.zeros(1, 3, det_size, det_size), path, [f"out{i}" for i in range(9)])


def export_inswapper(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A stand-in with insightface's ``inswapper_128.onnx`` interface, built with the ``onnx`` package: inputs
    ``target`` (1 x 3 x 128 x 128, the aligned RGB crop in 0..1) and ``source`` (1 x 512: the source's normed
    embedding times ``emap``, renormalised, as insightface's INSwapper feeds it), one 1 x 3 x 128 x 128 RGB output
    in 0..1, and the 512 x 512 ``emap`` as the graph's last initializer (where INSwapper reads it).

    It paints the whole crop one colour, sigmoid(source @ colour_map) (the target enters with weight 0), so the
    pasted region and the embedding the model was fed can be read off the swapped picture. Returns the matrices."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {"colour_map": rng.normal(0.0, 1.0, (512, 3)).astype(np.float32),
               "colour_shape": np.array([1, 3, 1, 1], np.int64), "zero": np.zeros((), np.float32),
               "emap": rng.normal(0.0, 512 ** -0.5, (512, 512)).astype(np.float32)}  # last: INSwapper's emap
    nodes = [helper.make_node("MatMul", ["source", "colour_map"], ["colour"]),
             helper.make_node("Sigmoid", ["colour"], ["colour_01"]),
             helper.make_node("Reshape", ["colour_01", "colour_shape"], ["colour_map_4d"]),
             helper.make_node("Mul", ["target", "zero"], ["target_weighted"]),
             helper.make_node("Add", ["target_weighted", "colour_map_4d"], ["output"])]
    graph = helper.make_graph(
        nodes, "inswapper_standin",
        [helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
         helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weights
