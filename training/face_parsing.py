"""A face-parsing mask for FaceCrafter's Attention Disentanglement loss, through facexlib's parsing networks.

FaceCrafter's M_n is "a binary face mask from a segmentation model" (EHANet [FC Eq. 4]); prepare's default
is MediaPipe's filled face oval (training/annotate.py). ``prepare --face-mask --face-parser bisenet|parsenet
--face-parsing-model FILE`` uses one of facexlib's CelebAMask-HQ parsers instead (the files facexlib's
``init_parsing_model`` downloads: ``parsing_bisenet.pth``, ``parsing_parsenet.pth``). The network is built
here from facexlib's own classes and the user's local file is read with ``weights_only=True`` (or as
safetensors), because facexlib's loader downloads and unpickles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# CelebAMask-HQ's 19 labels (facexlib's parsers): 0 background, 1 skin, 2/3 brows, 4/5 eyes, 6 glasses,
# 7/8 ears, 9 earrings, 10 nose, 11 mouth, 12/13 lips, 14 neck, 15 necklace, 16 cloth, 17 hair, 18 hat.
# The face is the skin and what lies on it; ears, hair and neck stay out, as they do from the face oval.
FACE_LABELS = (1, 2, 3, 4, 5, 6, 10, 11, 12, 13)
PARSING_SIZE = 512  # both networks are trained on 512 x 512 aligned faces
# Input normalisation as facexlib's own callers use each network (inference_parsing.py for BiSeNet,
# FaceRestoreHelper for ParseNet).
NORMALISATION = {"bisenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "parsenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def build_parsing_network(kind: str) -> torch.nn.Module:
    """facexlib's network of that kind at the size its published weights have (as init_parsing_model builds it)."""
    if kind == "bisenet":
        from facexlib.parsing.bisenet import BiSeNet

        return BiSeNet(num_class=19)
    if kind == "parsenet":
        from facexlib.parsing.parsenet import ParseNet

        return ParseNet(in_size=PARSING_SIZE, out_size=PARSING_SIZE, parsing_ch=19)
    raise ValueError(f"face parser {kind!r}: choose bisenet or parsenet")


def load_parsing_network(path, kind: str, device="cpu") -> torch.nn.Module:
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"the {kind} face parser needs its weights file (--face-parsing-model; facexlib's "
                                f"parsing_{kind}.pth); got {path!r}. Nothing is downloaded here")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    network = build_parsing_network(kind)
    network.load_state_dict(state, strict=True)
    return network.to(device).eval()


class FaceParser:
    """``parser(crop, landmarks=None) -> H x W bool``: the face labels of the network's parse of the crop.

    The crop (RGB uint8, prepare's FFHQ-style alignment, close to the parsers' training crops) is resized to
    512, parsed, and the label map is resized back (nearest).
    """

    def __init__(self, network: torch.nn.Module, kind: str, device="cpu"):
        self.network, self.kind, self.device = network, kind, torch.device(device)
        mean, std = NORMALISATION[kind]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_file(cls, path, kind: str, device="cpu") -> FaceParser:
        return cls(load_parsing_network(path, kind, device), kind, device)

    @torch.no_grad()
    def labels(self, crop: np.ndarray) -> np.ndarray:
        """H x W int64: CelebAMask-HQ labels at the crop's size."""
        import cv2

        height, width = crop.shape[:2]
        resized = cv2.resize(crop, (PARSING_SIZE, PARSING_SIZE), interpolation=cv2.INTER_LINEAR)
        pixels = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)[None].float() / 255.0
        logits = self.network(((pixels - self.mean) / self.std).to(self.device))[0]
        labels = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST).astype(np.int64)

    def __call__(self, crop: np.ndarray, landmarks=None) -> np.ndarray:
        return np.isin(self.labels(crop), FACE_LABELS)
