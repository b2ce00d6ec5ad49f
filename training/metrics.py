"""Evaluation metrics of the papers, on arrays (one row per image pair).

- Exp and LMS (EmojiDiff supp. A): in ``encoders.expression_metrics``, re-exported here.
- ID similarity (Arc2Face paper §4): cosine similarity of ArcFace embeddings.
- 3D Exp-MSE (Arc2Face paper §4): mean squared difference of SMIRK's FLAME parameters (all 55 by
  default: 50 expression, 2 eyelid, 3 jaw, which is what the adapter is conditioned on).
- FID: Fréchet distance between Gaussian fits of Inception pool features (see :class:`InceptionFeatures`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from encoders.expression_metrics import LMS_EPSILON, LMS_RATIOS, exp_mean, exp_score, lms_ratios, lms_score  # noqa: F401


def id_similarity(a, b) -> np.ndarray:
    """Cosine similarity per row of two B x D embedding arrays."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(norms, 1e-12)


def exp_mse(reference, generated, parts: slice = slice(None)) -> np.ndarray:
    """Mean squared difference of FLAME parameters per pair (``parts``: e.g. ``slice(0, 50)`` for expression only)."""
    reference, generated = np.atleast_2d(reference).astype(np.float64), np.atleast_2d(generated).astype(np.float64)
    return ((reference[:, parts] - generated[:, parts]) ** 2).mean(axis=-1)


# --- FID ------------------------------------------------------------------------------------

def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least two feature rows to fit a Gaussian; got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), as in the FID paper and pytorch-fid."""
    from scipy import linalg

    diff = np.asarray(mu1) - np.asarray(mu2)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer images than feature dimensions): nudge both diagonals.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real, generated) -> float:
    return frechet_distance(*gaussian_fit(real), *gaussian_fit(generated))


class InceptionWeightsMissing(RuntimeError):
    pass


class InceptionFeatures:
    """2048-d pool features of torchvision's Inception-v3 with weights from a local file.

    Nothing is downloaded: give the file (torchvision's ``inception_v3_google-*.pth``, read with
    ``weights_only=True``). Those ImageNet weights are not the TensorFlow FID Inception, so the
    numbers rank models consistently but are not comparable with FIDs published by pytorch-fid;
    for those, ``backend="pytorch-fid"`` uses pytorch-fid's network when it is installed and its
    weights are in torch's hub cache.
    """

    def __init__(self, weights=None, backend: str = "torchvision", device="cpu", batch_size: int = 16):
        import torch

        self.device, self.batch_size, self.backend = device, batch_size, backend
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
                if self.backend == "pytorch-fid":
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
