"""Expression value types passed between nodes: validated, batched, JSON-serialisable.

Each value holds a float32 tensor whose first dimension is the batch (one row per image or
video frame). A value with one row broadcasts over any batch.

| class | kind (JSON) | row shape | contents |
|---|---|---|---|
| :class:`FlameExpression` | ``flame_expression`` | 55 | SMIRK's FLAME parameters: 50 expression, 2 eyelid, 3 jaw |
| :class:`ArkitBlendshapes` | ``arkit_blendshapes`` | 52 | MediaPipe blendshape scores 0..1, :data:`ARKIT_BLENDSHAPE_NAMES` order |
| :class:`Landmarks` | ``face_landmarks`` | 478 x 3 | MediaPipe face mesh, x/y normalised to the image, z as MediaPipe gives it |
| :class:`Emotion` | ``emotion`` | 10 | valence, arousal (-1..1), then 8 probabilities in :data:`EMOTION_CLASSES` order |

Values are immutable in spirit: every operation returns a new value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import ClassVar

import torch

from .checks import rows_text

MAX_ROWS = 4096  # rows (frames, images) a value may have when read from text or a file: Interpolate's most frames
MAX_JSON_CHARS = 8 << 20  # 4,096 rows of 55 numbers need about 5 MB


class ExpressionValue:
    """Base class: a batch of fixed-shape expression rows."""

    kind: ClassVar[str] = "expression"
    row_shape: ClassVar[tuple[int, ...]] = ()
    max_abs_typed: ClassVar[float | None] = None  # refuse typed (JSON) values beyond +-this; None: no bound

    def __init__(self, values):
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
        if values.dim() == len(self.row_shape):
            values = values.unsqueeze(0)
        if tuple(values.shape[1:]) != self.row_shape or values.shape[0] == 0:
            raise ValueError(
                f"{self.kind} must have shape (batch, {', '.join(map(str, self.row_shape))}); "
                f"got {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all():
            bad_rows = sorted({int(i) for i in (~torch.isfinite(values)).flatten(1).any(1).nonzero().flatten()})
            raise ValueError(f"{self.kind} has NaN or infinite values in batch {rows_text(bad_rows)} (counting from 1)")
        self.values = values
        self._validate()

    # hooks for subclasses ------------------------------------------------------------------
    def _validate(self) -> None:
        """Extra checks on ``self.values`` (ranges); raise ValueError."""

    def _like(self, values: torch.Tensor) -> ExpressionValue:
        """A value of the same type (and metadata) holding ``values``."""
        return type(self)(values)

    @classmethod
    def clip_values(cls, values: torch.Tensor) -> torch.Tensor:
        """Bring raw rows into this type's valid range (used after filtering / editing)."""
        return values

    # batch access --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.values.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch={len(self)})"

    def rows_for(self, batch_size: int) -> torch.Tensor:
        """The values for a batch of ``batch_size`` images: one row broadcast, or one row each."""
        if len(self) == batch_size:
            return self.values
        if len(self) == 1:
            return self.values.expand(batch_size, *self.row_shape)
        raise ValueError(
            f"{self.kind} has {len(self)} rows but the batch has {batch_size} images; "
            "give one row (used for every image) or one row per image"
        )

    def row(self, index: int) -> ExpressionValue:
        """Row ``index`` (negative counts from the end) as a one-row value."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.kind} has {len(self)} rows; row {index} does not exist")
        return self._like(self.values[index].unsqueeze(0).clone())

    def select(self, indices: Sequence[int]) -> ExpressionValue:
        """The rows at ``indices``, in that order."""
        indices = list(indices)
        for index in indices:
            if not -len(self) <= index < len(self):
                raise IndexError(f"{self.kind} has {len(self)} rows; row {index} does not exist")
        return self._like(self.values[indices].clone())

    def repeat_to(self, batch_size: int) -> ExpressionValue:
        """This value with exactly ``batch_size`` rows (one row repeated, or unchanged)."""
        return self._like(self.rows_for(batch_size).clone())

    def interpolate(self, other: ExpressionValue, weight: float) -> ExpressionValue:
        """Linear blend: weight 0 gives self, 1 gives other (rows broadcast like ``rows_for``)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot interpolate {self.kind} with {other.kind}")
        size = max(len(self), len(other))
        blended = torch.lerp(self.rows_for(size), other.rows_for(size), float(weight))
        return self._like(blended)

    @classmethod
    def concat(cls, values: list[ExpressionValue]) -> ExpressionValue:
        if not values:
            raise ValueError(f"{cls.kind}: nothing to concatenate")
        for value in values:
            if not isinstance(value, cls):
                raise TypeError(f"cannot concatenate {getattr(value, 'kind', type(value).__name__)} into {cls.kind}")
        return values[0]._like(torch.cat([v.values for v in values]))

    # JSON ----------------------------------------------------------------------------------
    @classmethod
    def json_format(cls) -> str:
        """What :meth:`from_json` reads, with an example, for error messages."""
        size = "x".join(map(str, cls.row_shape))
        example = "[0.8, -0.3, 0.0, ...]"
        return (f"Expected a JSON list of {size} numbers (one row, e.g. {example} with {size} numbers), a list of such lists (one per "
                f'image), or a saved preset {{"kind": "{cls.kind}", "values": [...]}}')

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": self.values.tolist()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def _from_dict_extra(cls, data: dict) -> dict:
        """Constructor keyword arguments read from a JSON object besides ``values``."""
        return {}

    @classmethod
    def from_json(cls, text: str) -> ExpressionValue:
        """Read ``{"kind": ..., "values": [...]}`` or a bare list (one row or a list of rows), at most
        :data:`MAX_ROWS` rows."""
        if len(text) > MAX_JSON_CHARS:
            raise ValueError(f"{cls.kind}: {len(text):,} characters of JSON; at most {MAX_JSON_CHARS:,} "
                             f"({MAX_ROWS} rows) are read")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{cls.kind}: not valid JSON ({error})") from error
        extra = {}
        if isinstance(data, dict):
            if data.get("kind") != cls.kind:
                found = f"a preset of kind {data['kind']!r}" if "kind" in data else f"an object with keys {sorted(data)[:5]}"
                raise ValueError(f"{cls.kind}: got {found}. {cls.json_format()}")
            try:
                extra = cls._from_dict_extra(data)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{cls.kind}: {error}") from error
            data = data.get("values")
        if not isinstance(data, list):
            raise ValueError(f"{cls.kind}: got {type(data).__name__} {text.strip()[:40]!r}. {cls.json_format()}")
        rows = len(data) if data and isinstance(data[0], list) else 1
        if rows > MAX_ROWS:
            raise ValueError(f"{cls.kind}: {rows} rows; at most {MAX_ROWS} are read from text or a file")
        try:
            value = cls(torch.tensor(data, dtype=torch.float32), **extra)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{cls.kind}: {error}") from error
        if cls.max_abs_typed is not None:
            too_large = value.values.abs().flatten(1) > cls.max_abs_typed
            if too_large.any():
                rows = sorted({int(i) for i in too_large.any(1).nonzero().flatten()})
                raise ValueError(f"{cls.kind}: values beyond +-{cls.max_abs_typed:g} in {rows_text(rows)} (counting "
                                 f"from 1; largest {value.values.abs().max().item():g}); these parameters stay within "
                                 "a few units")
        return value


class FlameExpression(ExpressionValue):
    """FLAME blendshape parameters as SMIRK gives them: 50 expression, 2 eyelid, 3 jaw.

    Eyelids: index 50 left, 51 right (SMIRK's order), 0 open .. 1 closed. Jaw: axis-angle,
    52 opening (SMIRK applies relu), 53 sideways and 54 twist (SMIRK clamps both to +-0.2).
    """

    kind = "flame_expression"
    row_shape = (55,)
    # Our bound on typed values, not SMIRK's or FLAME's (which set none): faces SMIRK reads stay within a
    # few units, the sliders span +-3; 50 leaves room for exaggeration and refuses the absurd (1e30 from a typo).
    max_abs_typed: ClassVar[float | None] = 50.0
    EXPRESSION = slice(0, 50)
    EYELIDS = slice(50, 52)
    JAW = slice(52, 55)

    @classmethod
    def neutral(cls, batch_size: int = 1) -> FlameExpression:
        return cls(torch.zeros(batch_size, 55))

    @classmethod
    def from_parts(cls, expression, eyelids=None, jaw=None) -> FlameExpression:
        """Build from (B x 50) expression, optional (B x 2) eyelids and (B x 3) jaw."""
        expression = torch.as_tensor(expression, dtype=torch.float32)
        if expression.dim() == 1:
            expression = expression.unsqueeze(0)
        batch = expression.shape[0]
        eyelids = torch.zeros(batch, 2) if eyelids is None else torch.as_tensor(eyelids, dtype=torch.float32).reshape(batch, 2)
        jaw = torch.zeros(batch, 3) if jaw is None else torch.as_tensor(jaw, dtype=torch.float32).reshape(batch, 3)
        return cls(torch.cat([expression.reshape(batch, 50), eyelids, jaw], dim=1))

    @property
    def expression(self) -> torch.Tensor:
        return self.values[:, self.EXPRESSION]

    @property
    def eyelids(self) -> torch.Tensor:
        return self.values[:, self.EYELIDS]

    @property
    def jaw(self) -> torch.Tensor:
        return self.values[:, self.JAW]

    @staticmethod
    def smirk_clamp(values: torch.Tensor) -> torch.Tensor:
        """SMIRK's output clamps: eyelids 0..1, jaw opening >= 0, jaw sideways/twist +-0.2."""
        values = values.clone()
        values[..., 50:52] = values[..., 50:52].clamp(0.0, 1.0)
        values[..., 52] = values[..., 52].clamp(min=0.0)
        values[..., 53:55] = values[..., 53:55].clamp(-0.2, 0.2)
        return values

    def clamped(self) -> FlameExpression:
        """This expression with SMIRK's output clamps applied."""
        return FlameExpression(self.smirk_clamp(self.values))


# MediaPipe FaceLandmarker blendshape category names, in its output order (index 0 is `_neutral`).
ARKIT_BLENDSHAPE_NAMES: tuple[str, ...] = (
    "_neutral",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "eyeBlinkLeft", "eyeBlinkRight",
    "eyeLookDownLeft", "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight",
    "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight",
    "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthPressLeft", "mouthPressRight", "mouthPucker", "mouthRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthUpperUpLeft", "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight",
)
ARKIT_BLENDSHAPE_INDEX: dict[str, int] = {name: i for i, name in enumerate(ARKIT_BLENDSHAPE_NAMES)}

_RANGE_TOLERANCE = 1e-4


def _check_range(kind: str, what: str, values: torch.Tensor, low: float, high: float) -> None:
    bad = (values < low - _RANGE_TOLERANCE) | (values > high + _RANGE_TOLERANCE)
    if bad.any():
        rows = sorted({int(i) for i in bad.flatten(1).any(1).nonzero().flatten()})
        raise ValueError(f"{kind}: {what} must lie in [{low}, {high}]; rows {rows} do not")


class ArkitBlendshapes(ExpressionValue):
    """MediaPipe's 52 ARKit-style blendshape scores (0..1), named by :data:`ARKIT_BLENDSHAPE_NAMES`.

    *Left/*Right refer to the subject's face, as in MediaPipe.
    """

    kind = "arkit_blendshapes"
    row_shape = (52,)
    names: ClassVar[tuple[str, ...]] = ARKIT_BLENDSHAPE_NAMES

    def _validate(self) -> None:
        _check_range(self.kind, "blendshape scores", self.values, 0.0, 1.0)
        self.values = self.values.clamp(0.0, 1.0)

    @classmethod
    def clip_values(cls, values: torch.Tensor) -> torch.Tensor:
        return values.clamp(0.0, 1.0)

    @classmethod
    def neutral(cls, batch_size: int = 1) -> ArkitBlendshapes:
        """All scores zero."""
        return cls(torch.zeros(batch_size, 52))

    @staticmethod
    def index(name: str) -> int:
        try:
            return ARKIT_BLENDSHAPE_INDEX[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, ARKIT_BLENDSHAPE_NAMES, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown blendshape name {name!r}{hint}") from None

    @classmethod
    def from_dict(cls, scores: dict[str, float]) -> ArkitBlendshapes:
        """One row from ``{name: score}``; names not given are 0."""
        row = torch.zeros(52)
        for name, score in scores.items():
            row[cls.index(name)] = float(score)
        return cls(row)

    def as_dicts(self) -> list[dict[str, float]]:
        return [dict(zip(self.names, map(float, row))) for row in self.values]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "values": self.values.tolist()}

    @classmethod
    def _from_dict_extra(cls, data: dict) -> dict:
        names = data.get("names")
        if names is not None and list(names) != list(ARKIT_BLENDSHAPE_NAMES):
            raise ValueError("blendshape names in the JSON differ from MediaPipe's 52 names in order")
        return {}


# landmark indices of the iris centres (subject's right eye 468, left eye 473)
IRIS_CENTRES = (468, 473)


class Landmarks(ExpressionValue):
    """MediaPipe face mesh, 478 points with irises: x, y normalised to the image (0..1), z relative.

    ``image_size`` (height, width), when known, is the pixel size of the frame the coordinates
    were normalised to; it is kept through JSON, interpolation and batching.
    """

    kind = "face_landmarks"
    row_shape = (478, 3)

    def __init__(self, values, image_size: Sequence[int] | None = None):
        super().__init__(values)
        if image_size is not None:
            image_size = (int(image_size[0]), int(image_size[1]))
            if min(image_size) <= 0:
                raise ValueError(f"{self.kind}: image_size must be positive (height, width); got {image_size}")
        self.image_size: tuple[int, int] | None = image_size

    def _like(self, values: torch.Tensor) -> Landmarks:
        return Landmarks(values, image_size=self.image_size)

    @classmethod
    def concat(cls, values: list[ExpressionValue]) -> Landmarks:
        sizes = {v.image_size for v in values if isinstance(v, Landmarks)}
        result = super().concat(values)
        result.image_size = sizes.pop() if len(sizes) == 1 else None
        return result

    @classmethod
    def from_pixels(cls, points, image_size: Sequence[int], z=None) -> Landmarks:
        """From (B x) 478 x 2 (or x 3) pixel coordinates in an image of ``image_size`` (height, width)."""
        points = torch.as_tensor(points, dtype=torch.float32)
        if points.dim() == 2:
            points = points.unsqueeze(0)
        height, width = int(image_size[0]), int(image_size[1])
        xy = points[..., :2] / torch.tensor([width, height], dtype=torch.float32)
        if z is None:
            z = points[..., 2:3] if points.shape[-1] >= 3 else torch.zeros(*points.shape[:-1], 1)
        z = torch.as_tensor(z, dtype=torch.float32).reshape(*points.shape[:-1], 1)
        return cls(torch.cat([xy, z], dim=-1), image_size=(height, width))

    def pixels(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """B x 478 x 2 pixel coordinates (x = u * width, y = v * height)."""
        if height is None or width is None:
            if self.image_size is None:
                raise ValueError("landmarks: give the image height and width (the landmarks do not know them)")
            height, width = self.image_size
        return self.values[..., :2] * torch.tensor([float(width), float(height)])

    def iris_centres(self) -> torch.Tensor:
        """B x 2 x 3: the subject's right (468) and left (473) iris centres."""
        return self.values[:, list(IRIS_CENTRES)]

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.image_size is not None:
            data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def _from_dict_extra(cls, data: dict) -> dict:
        size = data.get("image_size")
        if size is None:
            return {}
        if not (isinstance(size, list) and len(size) == 2):
            raise ValueError("image_size must be [height, width]")
        return {"image_size": size}


# EmoNet's 8 expression classes, in its output order
EMOTION_CLASSES: tuple[str, ...] = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")


class Emotion(ExpressionValue):
    """Valence, arousal (-1..1) and the 8 class probabilities (0..1) of EmoNet: B x 10."""

    kind = "emotion"
    row_shape = (10,)
    classes: ClassVar[tuple[str, ...]] = EMOTION_CLASSES

    def _validate(self) -> None:
        _check_range(self.kind, "valence and arousal", self.values[:, :2], -1.0, 1.0)
        _check_range(self.kind, "class probabilities", self.values[:, 2:], 0.0, 1.0)
        self.values = self.clip_values(self.values)

    @classmethod
    def clip_values(cls, values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values[..., :2].clamp(-1.0, 1.0), values[..., 2:].clamp(0.0, 1.0)], dim=-1)

    @classmethod
    def neutral(cls, batch_size: int = 1) -> Emotion:
        row = torch.zeros(10)
        row[2] = 1.0
        return cls(row.expand(batch_size, 10).clone())

    @classmethod
    def from_parts(cls, valence, arousal, probabilities) -> Emotion:
        valence = torch.as_tensor(valence, dtype=torch.float32).reshape(-1, 1)
        arousal = torch.as_tensor(arousal, dtype=torch.float32).reshape(-1, 1)
        probabilities = torch.as_tensor(probabilities, dtype=torch.float32).reshape(-1, 8)
        return cls(torch.cat([valence, arousal, probabilities], dim=1))

    @property
    def valence(self) -> torch.Tensor:
        return self.values[:, 0]

    @property
    def arousal(self) -> torch.Tensor:
        return self.values[:, 1]

    @property
    def probabilities(self) -> torch.Tensor:
        return self.values[:, 2:]

    def dominant(self) -> list[str]:
        """The most probable class of each row."""
        return [self.classes[int(i)] for i in self.probabilities.argmax(dim=1)]

    def normalized(self) -> Emotion:
        """Probabilities rescaled to sum to 1 (rows summing to 0 become Neutral)."""
        probs = self.probabilities.clone()
        total = probs.sum(dim=1, keepdim=True)
        empty = total.squeeze(1) <= 1e-8
        probs[empty, 0] = 1.0
        total[empty] = 1.0
        return Emotion(torch.cat([self.values[:, :2], probs / total], dim=1))


VALUE_TYPES: dict[str, type[ExpressionValue]] = {
    cls.kind: cls for cls in (FlameExpression, ArkitBlendshapes, Landmarks, Emotion)
}


def value_from_json(text: str) -> ExpressionValue:
    """Read any expression value from ``{"kind": ..., "values": ...}`` JSON, choosing the type by kind."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error})") from error
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in VALUE_TYPES:
        raise ValueError(f"unknown expression kind {kind!r}; known kinds: {', '.join(VALUE_TYPES)}")
    return VALUE_TYPES[kind].from_json(text)
