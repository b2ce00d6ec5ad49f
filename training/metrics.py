"""Evaluation metrics of the papers, on arrays (one row per image pair).

- Exp and LMS (EmojiDiff supp. A): in ``encoders.expression_metrics``, re-exported here.
- ID similarity (Arc2Face paper §4): cosine similarity of ArcFace embeddings.
- 3D Exp-MSE (Arc2Face paper §4): mean squared difference of SMIRK's FLAME expression parameters (the
  first 50 of the 55; see ``FLAME_EXPRESSION``).
- FID: Fréchet distance between Gaussian fits of Inception pool features, computed by torchmetrics
  (see :class:`InceptionFeatures` for the feature networks and their weight files).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from encoders.expression_metrics import LMS_EPSILON, LMS_RATIOS, exp_mean, exp_score, lms_ratios, lms_score  # noqa: F401


def id_similarity(a, b) -> np.ndarray:
    """Cosine similarity per row of two B x D embedding arrays."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(norms, 1e-12)


# The FLAME expression parameters every expression column scores (3D Exp-MSE, Exp-RMSE, Exp-std): the first 50 of
# SMIRK's 55 (50 expression, 2 eyelid, 3 jaw). Both papers score "FLAME expression parameters", and the Arc2Face
# paper (§3) calls only e in R^50 that, apart from the eyelid and jaw poses, which are angles in another unit and
# would weigh in arbitrarily. The adapter is still conditioned on all 55.
FLAME_EXPRESSION = slice(0, 50)


def exp_mse(reference, generated) -> np.ndarray:
    """Mean squared difference of the FLAME expression parameters per pair (3D Exp-MSE)."""
    reference, generated = np.atleast_2d(reference).astype(np.float64), np.atleast_2d(generated).astype(np.float64)
    return ((reference[:, FLAME_EXPRESSION] - generated[:, FLAME_EXPRESSION]) ** 2).mean(axis=-1)


# --- FID ------------------------------------------------------------------------------------

def frechet_inception_distance(feature_module):
    """torchmetrics' FrechetInceptionDistance around ``feature_module`` (images or rows -> B x D features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature_module, reset_real_features=True).double()


def fid_from_features(real, generated) -> float:
    """FID of two feature sets (rows), computed by torchmetrics (the Frechet distance of their Gaussian fits)."""
    import torch

    real = torch.as_tensor(np.asarray(real, dtype=np.float64))
    generated = torch.as_tensor(np.asarray(generated, dtype=np.float64))
    if real.ndim != 2 or generated.ndim != 2 or min(len(real), len(generated)) < 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"need two sets of at least two D-dimensional feature rows; got {tuple(real.shape)} and "
                         f"{tuple(generated.shape)}")

    class Rows(torch.nn.Module):
        num_features = int(real.shape[1])

        def forward(self, rows):
            return rows

    metric = frechet_inception_distance(Rows())
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


class InceptionWeightsMissing(RuntimeError):
    pass


class InceptionFeatures:
    """2048-d pool features of an Inception-v3 with weights from a local file; nothing is downloaded.

    ``backend="fid-inception"``: the TensorFlow FID Inception as torch-fidelity ports it (through
    torchmetrics), from its weights file ``pt_inception-2015-12-05-6726825d.pth``: numbers comparable
    with published FIDs. ``"torchvision"``: torchvision's ``inception_v3_google-*.pth`` (read with
    ``weights_only=True``); those ImageNet weights are not the FID Inception, so the
    numbers rank models consistently but are not comparable with FIDs published by pytorch-fid;
    for those, ``backend="pytorch-fid"`` uses pytorch-fid's network when it is installed and its
    weights are in torch's hub cache.
    """

    def __init__(self, weights=None, backend: str = "torchvision", device="cpu", batch_size: int = 16):
        import torch

        self.device, self.batch_size, self.backend = device, batch_size, backend
        if backend == "fid-inception":
            if weights is None or not Path(weights).is_file():
                raise InceptionWeightsMissing(
                    "FID backend fid-inception needs the FID Inception weights file and none can be downloaded here: "
                    "pass --inception-weights with pt_inception-2015-12-05-6726825d.pth (torch-fidelity's)")
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                            feature_extractor_weights_path=str(weights)).to(device).eval()
            return
        if backend == "pytorch-fid":
            try:
                from pytorch_fid.inception import InceptionV3
            except ImportError as error:
                raise InceptionWeightsMissing("FID backend pytorch-fid needs `pip install pytorch-fid`") from error
            try:
                self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
            except Exception as error:  # its weights download fails offline
                raise InceptionWeightsMissing(f"pytorch-fid could not load its Inception weights: {error}") from error
            return
        if weights is None or not Path(weights).is_file():
            raise InceptionWeightsMissing(
                "FID needs Inception-v3 weights and none can be downloaded here: pass --inception-weights "
                "with torchvision's inception_v3_google-*.pth, or install pytorch-fid with its weights cached"
            )
        from torchvision.models import inception_v3

        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        model.fc = torch.nn.Identity()
        self.model = model.to(device).eval()

    def __call__(self, images: np.ndarray):
        """B x H x W x 3 uint8 RGB -> B x 2048 float64."""
        import torch
        import torch.nn.functional as F

        rows = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size])).permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).to(self.device)
                if self.backend == "fid-inception":  # takes uint8 pixels, resizes itself
                    features = self.model((x * 255).round().to(torch.uint8)).reshape(len(x), -1)
                elif self.backend == "pytorch-fid":
                    features = self.model(x)[0].flatten(1)
                else:
                    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
                    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
                    features = self.model((x - mean) / std)
                rows.append(features.double().cpu().numpy())
        return np.concatenate(rows)


def summarise(rows: list[Mapping], columns: list[str]) -> dict[str, dict[str, float]]:
    """Mean, std and count of each metric column over the rows where it is a finite number."""
    summary = {}
    for column in columns:
        values = np.array([row[column] for row in rows if isinstance(row.get(column), (int, float)) and np.isfinite(row[column])])
        if len(values):
            summary[column] = {"mean": float(values.mean()), "std": float(values.std()), "count": int(len(values))}
    return summary


# EmojiDiff supplementary B.1: IDI keeps a synthetic pair only within both thresholds (read as "keep",
# the printed "excluding ... <=" being inverted; spec E2/E3: Exp is the mean over the 52 blendshapes).
IDI_MAX_EXP_MEAN = 0.05
IDI_MAX_LMS = 0.18


def idi_keep(exp: float, lms: float, max_exp_mean: float = IDI_MAX_EXP_MEAN, max_lms: float = IDI_MAX_LMS) -> bool:
    """Whether an IDI pair passes: Exp mean <= 0.05 and LMS <= 0.18; either above drops it."""
    values = (float(exp), float(lms))
    if not all(math.isfinite(v) for v in values):
        return False
    return values[0] <= max_exp_mean and values[1] <= max_lms


# --- FaceCrafter's columns (its Table 1) and ID-only diversity (Table 2) -----------------------------
# The paper names the metrics but not their exact reductions, and its Exp-RMSE values (6.8-8.1) fit an
# l2 norm rather than a per-parameter RMSE (spec F9). Our reading, kept consistent: an "RMSE" over a set
# of pictures is the root of the mean over pictures of the squared l2 distance of the compared vector.

def set_rmse(target, generated) -> float:
    """sqrt(mean over rows of |t - g|^2): rows are vectors (or scalars)."""
    t, g = np.asarray(target, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if t.shape != g.shape or t.size == 0:
        raise ValueError(f"need two arrays of one non-empty shape; got {t.shape} and {g.shape}")
    squared = (t - g) ** 2
    return float(np.sqrt(squared.reshape(len(squared), -1).sum(axis=1).mean()))


def emotion_errors(target, generated) -> dict[str, float]:
    """EmoNet columns from B x 10 emotions (valence, arousal, 8 probabilities): V-RMSE, A-RMSE,
    Dist-RMSE (the 8 probabilities as one vector), Class-ACC in % (argmax agreement)."""
    t, g = np.atleast_2d(np.asarray(target, np.float64)), np.atleast_2d(np.asarray(generated, np.float64))
    if t.shape[-1] != 10 or t.shape != g.shape:
        raise ValueError(f"emotions must be B x 10 (valence, arousal, 8 probabilities); got {t.shape} and {g.shape}")
    return {"v_rmse": set_rmse(t[:, 0], g[:, 0]), "a_rmse": set_rmse(t[:, 1], g[:, 1]),
            "dist_rmse": set_rmse(t[:, 2:], g[:, 2:]),
            "class_acc": float(100.0 * np.mean(t[:, 2:].argmax(1) == g[:, 2:].argmax(1)))}


def exp_rmse(target, generated) -> float:
    """Exp-RMSE over SMIRK's FLAME expression parameters (``FLAME_EXPRESSION``; the paper used EMOCA's)."""
    return set_rmse(np.atleast_2d(target)[:, FLAME_EXPRESSION], np.atleast_2d(generated)[:, FLAME_EXPRESSION])


def pose_rmse(target_degrees, generated_degrees) -> float:
    """Pose error from MediaPipe head poses (yaw, pitch, roll in degrees), in radians as FLAME's pose."""
    return set_rmse(np.radians(np.atleast_2d(target_degrees)), np.radians(np.atleast_2d(generated_degrees)))


def parameter_std(values) -> float:
    """Diversity of one identity's samples: the std across samples of each parameter, averaged over parameters."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if len(values) < 2:
        raise ValueError("diversity needs at least two samples of an identity")
    return float(values.std(axis=0).mean())


def mean_pairwise(items, distance) -> float:
    """Mean of ``distance(a, b)`` over the unordered pairs of ``items`` (LPIPS diversity of one identity)."""
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items))]
    if not pairs:
        raise ValueError("diversity needs at least two samples of an identity")
    return float(np.mean([float(distance(items[i], items[j])) for i, j in pairs]))


class OptionalMetricMissing(RuntimeError):
    pass


def lpips_distance(backbone_weights, net: str = "alex", weights=None, device="cpu"):
    """LPIPS(a, b) for H x W x 3 uint8 pictures through the ``lpips`` package, nothing downloaded:
    ``backbone_weights`` is torchvision's ImageNet file of the backbone (``alexnet-owt-7be5be79.pth``
    for ``net="alex"``), ``weights`` the linear layers (default: the v0.1 file shipped in the package)."""
    import torch

    try:
        import lpips
    except ImportError as error:
        raise OptionalMetricMissing("LPIPS diversity needs the lpips package: pip install lpips") from error
    if backbone_weights is None or not Path(backbone_weights).is_file():
        raise OptionalMetricMissing(f"LPIPS needs the {net} backbone's torchvision weights file (--lpips-backbone); "
                                    "nothing can be downloaded here")
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, model_path=str(weights) if weights else None, verbose=False)
    state = torch.load(backbone_weights, map_location="cpu", weights_only=True)
    # lpips keeps torchvision's feature layers under their indices, split into slices
    slices = [getattr(model.net, f"slice{k}") for k in range(1, model.net.N_slices + 1)]
    loaded = 0
    for part in slices:
        for index, layer in part.named_children():
            own = {k: state[f"features.{index}.{k}"] for k in layer.state_dict()}
            layer.load_state_dict(own, strict=True)
            loaded += len(own)
    if loaded == 0:
        raise OptionalMetricMissing(f"{backbone_weights} holds no {net} feature weights")
    model = model.to(device).eval()

    def distance(a, b):
        def tensor(x):
            return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
        with torch.no_grad():
            return float(model(tensor(a), tensor(b)))
    return distance


def liqe_clip_file() -> Path:
    """Where pyiqa's LIQE looks for OpenAI's CLIP ViT-B/32 (torch hub's ``clip`` folder, under ``$TORCH_HOME``)."""
    import torch

    return Path(torch.hub.get_dir()) / "clip" / "ViT-B-32.pt"


def liqe_scorer(weights, device="cpu"):
    """LIQE image quality (1-5) via ``pyiqa`` with the user's weights file; a clear error when anything is absent.

    pyiqa (0.1.16) builds LIQE around OpenAI's CLIP ViT-B/32 file, which it checks by SHA256 and otherwise
    downloads, before loading the LIQE weights over it: without that file an offline run would stop on a
    network error, so its absence is said first."""
    if weights is None or not Path(weights).is_file():
        raise OptionalMetricMissing("LIQE needs its weights file (--liqe-weights, pyiqa's LIQE.pt); nothing can be downloaded here")
    clip = liqe_clip_file()
    if not clip.is_file():
        raise OptionalMetricMissing(f"pyiqa's LIQE also needs OpenAI's CLIP ViT-B-32.pt at {clip} (pyiqa checks its SHA256 "
                                    "and would otherwise download it; set TORCH_HOME to use another folder)")
    try:
        import pyiqa
    except ImportError as error:
        raise OptionalMetricMissing("LIQE needs the pyiqa package (pip install pyiqa) and its liqe weights file") from error
    metric = pyiqa.create_metric("liqe", device=device, pretrained_model_path=str(weights))

    def score(rgb):
        import torch

        return float(metric(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0))
    return score
