"""Tiny official-format model files and real pictures for the training tests.

- an antelopev2-style folder: a tiny ArcFace recogniser exported from torch to ONNX (16-d output,
  zero-padded to the tiny ID encoder's 32-d tokens as Arc2Face pads 512 to 768) and the
  SCRFD-shaped stand-in detector of ``onnx_face_models`` (it "finds" the real t1.jpg faces, and
  nothing in a black picture);
- ``SMIRK_em1.pt``: SMIRK's expression encoder with random weights under the published key names;
- a tiny AutoencoderKL saved with ``save_pretrained`` (the smoke config's ``tiny_vae`` weights);
- pictures that ship in packages (insightface's t1.jpg and Tom_Hanks_54745.png, scikit-image's
  astronaut), brought to t1's size so the stand-in detector's faces fall on image content;
- :func:`resume_after_kill`, the kill-and-resume check every training stage's tests run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from support.onnx_face_models import TinyRecognizer, _export, export_detector, insightface_images, load_t1

ID_DIM = 16


class Killed(Exception):
    """Stands for the process dying right after a step."""


def resume_after_kill(make_trainer, kill_after: int, uninterrupted):
    """Run ``make_trainer()`` until the process "dies" right after step ``kill_after``, then resume with a new
    ``make_trainer()`` in the same output folder. The resumed trainer must start from that step's checkpoint
    and give the ``uninterrupted`` run's loss at every later step. Returns the resumed trainer and its result."""

    def die(step, loss):
        if step == kill_after:
            raise Killed

    with pytest.raises(Killed):
        make_trainer().run(die)
    trainer = make_trainer()
    assert trainer.resumed_from.name == f"step-{kill_after:07d}"
    result = trainer.run()
    assert sorted(result.losses) == [step for step in sorted(uninterrupted.losses) if step > kill_after]
    for step in result.losses:
        assert result.losses[step] == uninterrupted.losses[step], step
    return trainer, result


def write_face_models(folder: Path) -> Path | None:
    """The antelopev2-style folder, or None when shared/testdata (the t1 face geometry) is absent."""
    from encoders.identity import DETECTOR_FILE

    t1 = load_t1()
    if t1 is None:
        return None
    rgb, boxes, kps = t1
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    recognizer = TinyRecognizer()
    recognizer.fc = torch.nn.Linear(recognizer.fc.in_features, ID_DIM)
    _export(recognizer, torch.zeros(1, 3, 112, 112), folder / "arcface.onnx", ["embedding"])
    export_detector(folder / DETECTOR_FILE, boxes, kps, [0.95, 0.9, 0.8], rgb.shape[:2], blank_sees_nothing=True)
    return folder


def write_smirk_checkpoint(path: Path, seed: int = 0) -> Path:
    from encoders.smirk import SMIRK_PREFIX, SmirkExpressionEncoder

    torch.manual_seed(seed)
    model = SmirkExpressionEncoder().eval()
    torch.save({SMIRK_PREFIX + k: v for k, v in model.state_dict().items()}, path)
    return path


def write_tiny_vae(folder: Path) -> Path:
    from training.tiny import tiny_vae

    tiny_vae({"seed": 0}).save_pretrained(folder)
    return folder


def write_pictures(folder: Path) -> list[Path]:
    """Five real pictures at t1.jpg's size (PNG), named in sorted order."""
    import cv2
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    t1 = cv2.imread(str(insightface_images() / "t1.jpg"))
    height, width = t1.shape[:2]
    hanks = cv2.imread(str(insightface_images() / "Tom_Hanks_54745.png"))
    astronaut = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    pictures = {
        "a_t1.png": t1,
        "b_t1_bright.png": cv2.convertScaleAbs(t1, alpha=1.2, beta=10),
        "c_hanks.png": cv2.resize(hanks, (width, height)),
        "d_astronaut.png": cv2.resize(astronaut, (width, height)),
        "e_t1_blur.png": cv2.GaussianBlur(t1, (0, 0), 3),
    }
    paths = []
    for name, image in pictures.items():
        cv2.imwrite(str(folder / name), image)
        paths.append(folder / name)
    return paths


def write_clip(path: Path, frames: int = 6, fps: float = 10.0) -> Path:
    """A short MJPG clip of t1.jpg drifting by a few pixels a frame (so frames differ)."""
    import cv2

    t1 = cv2.imread(str(insightface_images() / "t1.jpg"))
    height, width = t1.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for k in range(frames):
        writer.write(np.roll(t1, 2 * k, axis=1))
    writer.release()
    return path


class PreparedModels:
    """The model files prepare needs, written once per test module."""

    def __init__(self, root: Path):
        self.root = root
        self.insightface = write_face_models(root / "antelopev2")
        self.smirk = write_smirk_checkpoint(root / "SMIRK_em1.pt")
        self.vae = write_tiny_vae(root / "tiny_vae")

    def prepare_args(self, inputs, out, *extra) -> list[str]:
        return [*map(str, inputs), "--out", str(out), "--insightface", str(self.insightface), "--smirk", str(self.smirk),
                "--resolution", "64", "--provider", "cpu", "--no-progress", *extra]


class FakeSwapper:
    """A test swapper for IDI, not a face swapper: returns the source portrait unchanged, so the filter compares
    the real image X with the real portrait P, whose MediaPipe fields the demo set holds."""

    def swap(self, source, target):
        return source.copy()
