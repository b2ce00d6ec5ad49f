"""EmojiDiff's expression metrics (supplementary A), on arrays with one row per image pair.

- Exp (Eq. 1): |b_ref - b_gen| over the 52 MediaPipe blendshapes (index 0 ``_neutral`` included).
  The paper writes a sum, but its numbers (0.054-0.163) and the IDI threshold 0.05 fit the mean
  (sum / 52): :func:`exp_score` gives the sum, :func:`exp_mean` the mean; compare with the paper
  through the mean.
- LMS (Eqs. 2-3): movement ratios of eyes, pupils and mouth from the 478 MediaPipe landmarks,
  summed absolute differences over S = {leye, reye, lpupil, rpupil, mouth}:

      r_leye   = |l145 - l159| / max(1e-5, |l133 - l33|)
      r_lpupil = |l133 - l468| / max(1e-5, |l133 - l33|)
      r_reye   = |l374 - l386| / max(1e-5, |l263 - l362|)
      r_rpupil = |l263 - l473| / max(1e-5, |l263 - l362|)
      r_mouth  = |l17 - l0|    / max(1e-5, |l291 - l61|)

  Distances are taken on x, y in pixels when the image size is known (a ratio of two
  distances does not depend on the scale, but normalised x and y are scaled differently on a
  non-square picture); the paper does not say whether z is used, and it is not here.

Pure numpy: ComfyUI nodes and the training package both use it.
"""

from __future__ import annotations

import numpy as np

BLENDSHAPE_COUNT = 52
LMS_EPSILON = 1e-5
# (numerator pair, denominator pair) per ratio, MediaPipe landmark indices.
LMS_RATIOS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "leye": ((145, 159), (133, 33)),
    "lpupil": ((133, 468), (133, 33)),
    "reye": ((374, 386), (263, 362)),
    "rpupil": ((263, 473), (263, 362)),
    "mouth": ((17, 0), (291, 61)),
}


def exp_score(reference, generated) -> np.ndarray:
    """EmojiDiff's Exp per pair: sum of |b_ref - b_gen| over the 52 blendshapes. Inputs B x 52 (or 52)."""
    reference, generated = np.atleast_2d(reference).astype(np.float64), np.atleast_2d(generated).astype(np.float64)
    if reference.shape[-1] != 52 or generated.shape[-1] != 52:
        raise ValueError(f"blendshapes must have 52 values; got {reference.shape} and {generated.shape}")
    return np.abs(reference - generated).sum(axis=-1)


def exp_mean(reference, generated) -> np.ndarray:
    """Exp as a mean over the 52 blendshapes (the sum / 52): the scale of the paper's tables and its 0.05 threshold."""
    return exp_score(reference, generated) / BLENDSHAPE_COUNT


def lms_ratios(landmarks, image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The five movement ratios of B x 478 x (2 or 3) landmarks (normalised x, y as MediaPipe gives them).

    ``image_size`` (height, width) turns normalised coordinates into pixels first.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim == 2:
        points = points[None]
    if points.shape[1] != 478 or points.shape[2] < 2:
        raise ValueError(f"landmarks must be B x 478 x 2 or 3 (MediaPipe with irises); got {points.shape}")
    xy = points[..., :2]
    if image_size is not None:
        xy = xy * np.array([image_size[1], image_size[0]], dtype=np.float64)

    def distance(a: int, b: int) -> np.ndarray:
        return np.linalg.norm(xy[:, a] - xy[:, b], axis=-1)

    return {name: distance(*top) / np.maximum(LMS_EPSILON, distance(*bottom)) for name, (top, bottom) in LMS_RATIOS.items()}


def lms_score(reference, generated, reference_size=None, generated_size=None) -> np.ndarray:
    """EmojiDiff's LMS per pair: sum over the five ratios of |r_ref - r_gen|."""
    ref, gen = lms_ratios(reference, reference_size), lms_ratios(generated, generated_size)
    return sum(np.abs(ref[name] - gen[name]) for name in LMS_RATIOS)


def expression_scores(reference_blendshapes, generated_blendshapes, reference_landmarks, generated_landmarks,
                      reference_size=None, generated_size=None) -> dict[str, np.ndarray]:
    """Exp (mean and sum) and LMS per generated image; one reference for all, or one per generated image."""
    reference_blendshapes = np.atleast_2d(np.asarray(reference_blendshapes, dtype=np.float64))
    generated_blendshapes = np.atleast_2d(np.asarray(generated_blendshapes, dtype=np.float64))
    count, references = generated_blendshapes.shape[0], reference_blendshapes.shape[0]
    if references not in (1, count):
        raise ValueError(f"{references} reference images for {count} generated images: give one reference, or one per image")
    rows = np.zeros(count, dtype=int) if references == 1 else np.arange(count)
    reference_landmarks = np.asarray(reference_landmarks, dtype=np.float64)[rows]
    return {"exp_mean": exp_mean(reference_blendshapes[rows], generated_blendshapes),
            "exp_sum": exp_score(reference_blendshapes[rows], generated_blendshapes),
            "lms": lms_score(reference_landmarks, generated_landmarks, reference_size, generated_size)}
