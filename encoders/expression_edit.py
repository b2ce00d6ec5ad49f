"""Hands-on expression controls: editors, neutralize, interpolation with easing, keyframes,
temporal smoothing and JSON presets.

Easing curves (``t`` runs 0..1 from A to B):
- ``linear``: t
- ``ease_in``: t^2 (starts slowly)
- ``ease_out``: 1 - (1 - t)^2 (ends slowly)
- ``ease_in_out``: 3t^2 - 2t^3 (smoothstep: slow at both ends)

Temporal smoothing of per-frame values (rows in frame order):
- ``ema``: exponential moving average run forwards then backwards (zero phase lag);
  ``strength`` s in [0, 1): each step keeps s of the running value (0 = no smoothing);
- ``moving_average``: centred box filter of ``window`` frames (shorter at the ends);
- ``savgol``: Savitzky-Golay, a least-squares polynomial of degree ``order`` fitted over a
  ``window`` of frames (shifted inwards at the ends) and evaluated at each frame; keeps peaks
  better than a box filter.
After smoothing, values are brought back into their type's range (blendshapes 0..1 etc.).

Presets are JSON files ``<folder>/<kind>/<name>.json`` holding ``{"kind", "values", ...}``;
never pickles.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .expressions import (
    ARKIT_BLENDSHAPE_NAMES,
    MAX_ROWS,
    VALUE_TYPES,
    ArkitBlendshapes,
    Emotion,
    ExpressionValue,
    FlameExpression,
    Landmarks,
)

logger = logging.getLogger(__name__)


# --- FLAME editor -------------------------------------------------------------------------------

class FlameControl(NamedTuple):
    name: str
    index: int
    low: float
    high: float
    tooltip: str


FLAME_COMPONENT_LIMIT = 3.0

FLAME_CONTROLS: dict[str, FlameControl] = {
    c.name: c for c in (
        FlameControl("jaw_open", 52, 0.0, 0.5, "Jaw opening (FLAME jaw pose, radians; SMIRK keeps it >= 0)"),
        FlameControl("jaw_sideways", 53, -0.2, 0.2, "Jaw moved sideways (radians; SMIRK's range is +-0.2)"),
        FlameControl("jaw_twist", 54, -0.2, 0.2, "Jaw rotation about the face's forward axis (radians; +-0.2)"),
        FlameControl("eyelid_left", 50, 0.0, 1.0, "Left eyelid closure: 0 open, 1 closed"),
        FlameControl("eyelid_right", 51, 0.0, 1.0, "Right eyelid closure: 0 open, 1 closed"),
    )
}
for _i in range(50):
    FLAME_CONTROLS[f"expression_{_i + 1}"] = FlameControl(
        f"expression_{_i + 1}", _i, -FLAME_COMPONENT_LIMIT, FLAME_COMPONENT_LIMIT,
        f"FLAME expression component {_i + 1} (components are ordered by how much they move the face)",
    )


def flame_control_specs(n_components: int = 10) -> list[FlameControl]:
    """The named controls a FLAME editor exposes: jaw, eyelids, then the leading components."""
    named = [FLAME_CONTROLS[n] for n in ("jaw_open", "jaw_sideways", "jaw_twist", "eyelid_left", "eyelid_right")]
    return named + [FLAME_CONTROLS[f"expression_{i + 1}"] for i in range(n_components)]


def _warn_clamped(what: str, name: str, value: float, low: float, high: float) -> float:
    if value < low or value > high:
        clamped = min(max(value, low), high)
        logger.warning("%s %s = %.4g is outside [%g, %g]; clamped to %.4g", what, name, value, low, high, clamped)
        return clamped
    return value


def edit_flame(base: FlameExpression | None = None, mode: str = "offset",
               controls: Mapping[str, float | None] | None = None, **named: float | None) -> FlameExpression:
    """Edit a FLAME expression with named controls (see :data:`FLAME_CONTROLS`).

    ``base``: the starting expression (neutral when None), any number of rows. ``mode``
    "offset" adds each control's value to the base (0 leaves it); "set" replaces it. Controls
    that are None are left alone. Results outside a control's range are clamped with a warning.
    """
    if mode not in ("offset", "set"):
        raise ValueError(f"mode must be 'offset' or 'set'; got {mode!r}")
    values = (base if base is not None else FlameExpression.neutral()).values.clone()
    requested = dict(controls or {})
    requested.update(named)
    for name, amount in requested.items():
        if amount is None:
            continue
        control = FLAME_CONTROLS.get(name)
        if control is None:
            raise KeyError(f"unknown FLAME control {name!r}; known: jaw_open, jaw_sideways, jaw_twist, "
                           "eyelid_left, eyelid_right, expression_1 .. expression_50")
        amount = float(amount)
        if not np.isfinite(amount):
            raise ValueError(f"FLAME control {name} is not a finite number: {amount}")
        if mode == "offset" and amount == 0.0:
            continue
        column = values[:, control.index] + amount if mode == "offset" else torch.full_like(values[:, control.index], amount)
        for row in range(column.shape[0]):
            column[row] = _warn_clamped("FLAME control", name, float(column[row]), control.low, control.high)
        values[:, control.index] = column
    return FlameExpression(values)


def edit_blendshapes(base: ArkitBlendshapes | None = None, scores: Mapping[str, float | None] | None = None,
                     mode: str = "set", **named: float | None) -> ArkitBlendshapes:
    """Edit ARKit blendshapes by name (0..1). ``mode`` "set" replaces, "offset" adds; results outside
    0..1 are clamped with a warning; unknown names raise KeyError with suggestions."""
    if mode not in ("offset", "set"):
        raise ValueError(f"mode must be 'offset' or 'set'; got {mode!r}")
    values = (base if base is not None else ArkitBlendshapes.neutral()).values.clone()
    requested = dict(scores or {})
    requested.update(named)
    for name, amount in requested.items():
        if amount is None:
            continue
        index = ArkitBlendshapes.index(name)
        amount = float(amount)
        if not np.isfinite(amount):
            raise ValueError(f"blendshape {name} is not a finite number: {amount}")
        column = values[:, index] + amount if mode == "offset" else torch.full_like(values[:, index], amount)
        for row in range(column.shape[0]):
            column[row] = _warn_clamped("blendshape", name, float(column[row]), 0.0, 1.0)
        values[:, index] = column
    return ArkitBlendshapes(values)


FLAME_PARTS = {"expression": FlameExpression.EXPRESSION, "eyelids": FlameExpression.EYELIDS, "jaw": FlameExpression.JAW}


def neutralize(value: ExpressionValue, amount: float = 1.0, parts: Sequence[str] | None = None) -> ExpressionValue:
    """Move ``value`` towards neutral by ``amount`` (0 unchanged, 1 fully neutral).

    Neutral: FLAME zeros; blendshapes zeros; emotion valence = arousal = 0, Neutral = 1.
    ``parts`` (FLAME only): any of "expression", "eyelids", "jaw" (default all).
    """
    amount = _warn_clamped("neutralize", "amount", float(amount), 0.0, 1.0)
    if isinstance(value, Landmarks):
        raise TypeError("landmarks have no neutral form; neutralize the FLAME expression or blendshapes instead")
    neutral = type(value).neutral(len(value))
    target = neutral.values
    if parts is not None:
        if not isinstance(value, FlameExpression):
            raise ValueError("parts can only be chosen for FLAME expressions")
        target = value.values.clone()
        for part in parts:
            if part not in FLAME_PARTS:
                raise ValueError(f"unknown FLAME part {part!r}; known: {', '.join(FLAME_PARTS)}")
            target[:, FLAME_PARTS[part]] = 0.0
    return value._like(torch.lerp(value.values, target, amount))


# --- easing, interpolation, keyframes ---------------------------------------------------------

EASINGS: tuple[str, ...] = ("linear", "ease_in", "ease_out", "ease_in_out")


def ease(t, easing: str = "linear") -> torch.Tensor:
    """Apply an easing curve to ``t`` in 0..1 (see module docstring)."""
    t = torch.as_tensor(t, dtype=torch.float32).clamp(0.0, 1.0)
    key = easing.strip().lower().replace("-", "_").replace(" ", "_")
    if key == "linear":
        return t
    if key == "ease_in":
        return t * t
    if key == "ease_out":
        return 1 - (1 - t) ** 2
    if key == "ease_in_out":
        return t * t * (3 - 2 * t)
    raise ValueError(f"unknown easing {easing!r}; known: {', '.join(EASINGS)}")


def _single_row(value: ExpressionValue, what: str) -> torch.Tensor:
    if len(value) != 1:
        raise ValueError(f"{what} must be a single expression (one row); it has {len(value)} rows")
    return value.values[0]


def interpolate_frames(start: ExpressionValue, end: ExpressionValue, frames: int, easing: str = "linear") -> ExpressionValue:
    """``frames`` rows going from ``start`` (first row) to ``end`` (last row) along ``easing``.

    Both must be one-row values of the same type. One frame gives ``start``.
    """
    if type(start) is not type(end):
        raise TypeError(f"cannot interpolate {start.kind} to {end.kind}")
    frames = int(frames)
    if frames < 1:
        raise ValueError(f"frames must be at least 1; got {frames}")
    a, b = _single_row(start, "the start"), _single_row(end, "the end")
    t = torch.linspace(0.0, 1.0, frames) if frames > 1 else torch.zeros(1)
    w = ease(t, easing).unsqueeze(-1)
    rows = a.flatten() + (b.flatten() - a.flatten()) * w
    return start._like(rows.reshape(frames, *start.row_shape))


def keyframe_sequence(keyframes: Sequence[tuple[int, ExpressionValue]], length: int,
                      easing: str = "linear") -> ExpressionValue:
    """A ``length``-frame sequence through ``(frame, value)`` keyframes (one-row values of one type).

    Frames before the first keyframe hold its value, after the last hold the last; each segment
    between keyframes is eased with ``easing``.
    """
    length = int(length)
    if length < 1:
        raise ValueError(f"length must be at least 1; got {length}")
    if not keyframes:
        raise ValueError("give at least one keyframe")
    ordered = sorted(((int(f), v) for f, v in keyframes), key=lambda kv: kv[0])
    kinds = {type(v) for _, v in ordered}
    if len(kinds) != 1:
        raise TypeError("all keyframes must be the same kind of expression")
    frames = [f for f, _ in ordered]
    if len(set(frames)) != len(frames):
        raise ValueError(f"two keyframes share a frame: {frames}")
    if frames[0] < 0 or frames[-1] >= length:
        raise ValueError(f"keyframe frames must lie in 0..{length - 1}; got {frames}")
    rows = [_single_row(v, f"keyframe at frame {f}") for f, v in ordered]
    out = torch.empty(length, *ordered[0][1].row_shape)
    for i in range(length):
        if i <= frames[0]:
            out[i] = rows[0]
        elif i >= frames[-1]:
            out[i] = rows[-1]
        else:
            k = max(j for j, f in enumerate(frames) if f <= i)
            t = (i - frames[k]) / (frames[k + 1] - frames[k])
            out[i] = torch.lerp(rows[k], rows[k + 1], float(ease(t, easing)))
    return ordered[0][1]._like(out)


def parse_frame_list(text: str | Sequence[int]) -> list[int]:
    """Frame numbers from "0, 12, 24" (commas or spaces), or a sequence of ints."""
    if not isinstance(text, str):
        return [int(f) for f in text]
    parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
    if len(parts) > MAX_ROWS:
        raise ValueError(f"{len(parts)} frame numbers; at most {MAX_ROWS} keyframes")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"frame list must be whole numbers separated by commas; got {text!r}") from None


def keyframes_from_rows(value: ExpressionValue, frames: str | Sequence[int], length: int,
                        easing: str = "linear") -> ExpressionValue:
    """Keyframes given as a K-row value and K frame numbers (row k sits at frames[k])."""
    frames = parse_frame_list(frames)
    if len(frames) != len(value):
        raise ValueError(f"{len(frames)} frame numbers for {len(value)} keyframe rows; give one frame per row")
    return keyframe_sequence([(f, value.row(k)) for k, f in enumerate(frames)], length, easing)


# --- temporal smoothing --------------------------------------------------------------------------

SMOOTHING_METHODS: tuple[str, ...] = ("ema", "moving_average", "savgol")


def _ema(x: np.ndarray, strength: float) -> np.ndarray:
    alpha = 1.0 - strength
    forward = x.copy()
    for t in range(1, len(x)):
        forward[t] = alpha * x[t] + strength * forward[t - 1]
    backward = forward.copy()
    for t in range(len(x) - 2, -1, -1):
        backward[t] = alpha * forward[t] + strength * backward[t + 1]
    return backward


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    out = np.empty_like(x)
    for t in range(len(x)):
        out[t] = x[max(0, t - half) : t + half + 1].mean(axis=0)
    return out


def _savgol(x: np.ndarray, window: int, order: int) -> np.ndarray:
    n = len(x)
    window = min(window, n if n % 2 == 1 else n - 1)
    if window < 1:
        return x.copy()
    order = min(order, window - 1)
    half = window // 2
    out = np.empty_like(x)
    for t in range(n):
        start = min(max(t - half, 0), n - window)
        offsets = np.arange(start, start + window) - t
        design = np.vander(offsets.astype(np.float64), order + 1, increasing=True)
        coefficients = np.linalg.pinv(design)  # (order+1) x window
        out[t] = coefficients[0] @ x[start : start + window]  # polynomial value at offset 0
    return out


def smooth_sequence(value: ExpressionValue, method: str = "ema", strength: float = 0.5, window: int = 5,
                    order: int = 2) -> ExpressionValue:
    """Smooth per-frame rows over time (see module docstring for the methods)."""
    if method not in SMOOTHING_METHODS:
        raise ValueError(f"unknown smoothing method {method!r}; known: {', '.join(SMOOTHING_METHODS)}")
    if len(value) < 2:
        return value
    x = value.values.reshape(len(value), -1).double().numpy()
    if method == "ema":
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"ema strength must be in [0, 1); got {strength}")
        y = _ema(x, float(strength))
    else:
        window = int(window)
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd number of frames >= 1; got {window}")
        y = _moving_average(x, window) if method == "moving_average" else _savgol(x, window, int(order))
    rows = torch.from_numpy(y).float().reshape(value.values.shape)
    rows = type(value).clip_values(rows)
    if isinstance(value, Emotion):
        return value._like(rows).normalized()
    return value._like(rows)


# --- presets -------------------------------------------------------------------------------------

_PRESET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\- .]{0,99}")  # used with fullmatch: "$" would let a final newline in


def _preset_path(folder: str | os.PathLike, kind: str, name: str) -> Path:
    name = name[:-5] if name.endswith(".json") else name
    if not _PRESET_NAME.fullmatch(name) or name.endswith((" ", ".")):
        raise ValueError(f"invalid preset name {name!r}: use letters, digits, spaces, '_', '-', '.' "
                         "(no path separators, not starting with '.' or '-')")
    return Path(folder) / kind / f"{name}.json"


def save_preset(value: ExpressionValue, folder: str | os.PathLike, name: str, overwrite: bool = True) -> Path:
    """Write ``value`` as ``<folder>/<kind>/<name>.json``; returns the path."""
    path = _preset_path(folder, value.kind, name)
    if path.exists() and not overwrite:
        raise FileExistsError(f"preset {name!r} already exists: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = value.to_dict()
    data["name"] = path.stem
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_preset_file(path: str | os.PathLike, expected: type[ExpressionValue] | None = None) -> ExpressionValue:
    """Read a preset file; ``expected`` checks its kind (and length, through the type)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise FileNotFoundError(f"cannot read preset {path}: {error}") from error
    try:
        if expected is not None:
            return expected.from_json(text)
        data = json.loads(text)
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind not in VALUE_TYPES:
            raise ValueError(f"unknown expression kind {kind!r}")
        return VALUE_TYPES[kind].from_json(text)
    except (ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"preset {path}: {error}") from error


def load_preset(folder: str | os.PathLike, name: str, expected: type[ExpressionValue]) -> ExpressionValue:
    """Read ``<folder>/<kind>/<name>.json`` (or a built-in preset of that name, see :func:`builtin_preset`)."""
    path = _preset_path(folder, expected.kind, name)
    if not path.is_file():
        builtin = BUILTIN_PRESETS.get(expected.kind, {}).get(name)
        if builtin is not None:
            return builtin()
        known = list_presets(folder, expected)
        raise FileNotFoundError(f"no {expected.kind} preset {name!r} in {path.parent}; available: {', '.join(known) or 'none'}")
    return load_preset_file(path, expected)


def list_presets(folder: str | os.PathLike, expected: type[ExpressionValue], include_builtin: bool = True) -> list[str]:
    """Preset names for a kind: built-in ones first, then the user's files (sorted)."""
    names = list(BUILTIN_PRESETS.get(expected.kind, {})) if include_builtin else []
    directory = Path(folder) / expected.kind
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            if path.stem not in names:
                names.append(path.stem)
    return names


def _arkit(**scores: float) -> ArkitBlendshapes:
    return ArkitBlendshapes.from_dict(scores)


def _flame(**controls: float) -> FlameExpression:
    return edit_flame(None, mode="set", **controls)


def _emotion(name: str):
    def build() -> Emotion:
        from .emotion import emotion_from_class

        return emotion_from_class(name, 1.0)

    return build


# Built-in presets (name -> factory). FLAME ones only use the controls whose meaning is fixed
# (jaw, eyelids); FLAME expression components have no fixed semantic labels.
BUILTIN_PRESETS: dict[str, dict[str, Callable[[], ExpressionValue]]] = {
    FlameExpression.kind: {
        "neutral": FlameExpression.neutral,
        "mouth_open": lambda: _flame(jaw_open=0.3),
        "eyes_closed": lambda: _flame(eyelid_left=1.0, eyelid_right=1.0),
        "wink_left": lambda: _flame(eyelid_left=1.0),
        "wink_right": lambda: _flame(eyelid_right=1.0),
    },
    ArkitBlendshapes.kind: {
        "neutral": ArkitBlendshapes.neutral,
        "smile": lambda: _arkit(mouthSmileLeft=0.8, mouthSmileRight=0.8, cheekSquintLeft=0.3, cheekSquintRight=0.3),
        "surprise": lambda: _arkit(browInnerUp=0.8, browOuterUpLeft=0.7, browOuterUpRight=0.7, eyeWideLeft=0.6,
                                   eyeWideRight=0.6, jawOpen=0.5),
        "frown": lambda: _arkit(browDownLeft=0.7, browDownRight=0.7, mouthFrownLeft=0.6, mouthFrownRight=0.6),
        "eyes_closed": lambda: _arkit(eyeBlinkLeft=1.0, eyeBlinkRight=1.0),
        "mouth_open": lambda: _arkit(jawOpen=0.6),
        "pucker": lambda: _arkit(mouthPucker=0.8, mouthFunnel=0.3),
    },
    Emotion.kind: {name.lower(): _emotion(name) for name in
                   ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")},
}


def builtin_preset(kind: str, name: str) -> ExpressionValue:
    try:
        return BUILTIN_PRESETS[kind][name]()
    except KeyError:
        raise KeyError(f"no built-in {kind} preset {name!r}; known: {', '.join(BUILTIN_PRESETS.get(kind, {}))}") from None


__all__ = [
    "ARKIT_BLENDSHAPE_NAMES", "BUILTIN_PRESETS", "EASINGS", "FLAME_CONTROLS", "SMOOTHING_METHODS", "FlameControl",
    "builtin_preset", "ease", "edit_blendshapes", "edit_flame", "flame_control_specs", "interpolate_frames",
    "keyframe_sequence", "keyframes_from_rows", "list_presets", "parse_frame_list", "load_preset", "load_preset_file", "neutralize", "save_preset",
    "smooth_sequence",
]
