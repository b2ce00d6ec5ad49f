"""Hands-on expression controls: editors, manual emotion, neutralize, interpolation, keyframes, smoothing,
batching, presets and preview charts. All maths lives in ``encoders.expression_edit`` / ``encoders.previews``.

Operations that work on any kind of expression value (FLAME expression, ARKit blendshapes, emotion,
landmarks) come as one small node per kind, generated from one class (``per_kind``): a node's output
socket has one fixed type in ComfyUI, so a typed node per kind is what keeps the graph type-safe
(a FLAME interpolation can only feed a FLAME input). They are named "<operation> (<kind>)".

Presets are JSON files in ``<ComfyUI user directory>/expression_adapters/presets/<kind>/<name>.json``.
Slider values outside a control's range are clamped by the library, with a warning in the console.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import folder_paths
from comfy_api.latest import io, ui

from ..encoders.core_face_landmarks import as_blendshapes, as_landmarks
from ..encoders.emotion import emotion_from_class, emotion_from_valence_arousal
from ..encoders.expression_edit import (
    EASINGS,
    SMOOTHING_METHODS,
    edit_blendshapes,
    edit_flame,
    flame_control_specs,
    interpolate_frames,
    keyframes_from_rows,
    list_presets,
    load_preset,
    neutralize,
    save_preset,
    smooth_sequence,
)
from ..encoders.expressions import (
    ARKIT_BLENDSHAPE_NAMES,
    EMOTION_CLASSES,
    MAX_ROWS,
    ArkitBlendshapes,
    Emotion,
    ExpressionValue,
    FlameExpression,
    Landmarks,
)
from ..encoders.previews import blendshape_chart, emotion_chart, flame_chart
from .types import (
    ArkitBlendshapesType,
    EmotionType,
    FaceLandmarksType,
    FlameExpressionType,
    or_core_face_landmarks,
)
from .validation import check_choices, check_numbers

CATEGORY = "expression_adapters/expression"
FLAME_EDITOR_COMPONENTS = 10


def presets_folder() -> str:
    return os.path.join(folder_paths.get_user_directory(), "expression_adapters", "presets")


class Kind(NamedTuple):
    key: str  # node id suffix and display label
    value_type: type[ExpressionValue]
    socket: type  # io.Custom socket type
    name: str  # input/output name
    from_core: Callable | None = None  # reads core's FACE_LANDMARKS as this kind, where it carries one

    def input(self, name: str, **options):
        if self.from_core is None:
            return self.socket.Input(name, **options)
        return or_core_face_landmarks(self.socket, name, **options)

    def read(self, value):
        """The input's value as ``value_type`` (core's FACE_LANDMARKS converted); None stays None."""
        return value if self.from_core is None or value is None else self.from_core(value)


FLAME = Kind("FLAME", FlameExpression, FlameExpressionType, "expression")
ARKIT = Kind("ARKit", ArkitBlendshapes, ArkitBlendshapesType, "blendshapes", as_blendshapes)
EMOTION = Kind("Emotion", Emotion, EmotionType, "emotion")
LANDMARKS = Kind("Landmarks", Landmarks, FaceLandmarksType, "landmarks", as_landmarks)
ALL_KINDS = (FLAME, ARKIT, EMOTION, LANDMARKS)
PRESET_KINDS = (FLAME, ARKIT, EMOTION)


def slider_range(low: float, high: float) -> tuple[float, float]:
    """Widget range of an editor slider: the control's range, widened to +-its span so offsets fit;
    the library clamps the result to the control's range (with a warning)."""
    span = high - low
    return min(low, -span), max(high, span)


# --- editors ----------------------------------------------------------------------------------------

class FlameExpressionEditor(io.ComfyNode):
    CONTROLS = flame_control_specs(FLAME_EDITOR_COMPONENTS)

    @classmethod
    def define_schema(cls):
        sliders = []
        for control in cls.CONTROLS:
            low, high = slider_range(control.low, control.high)
            sliders.append(io.Float.Input(control.name, default=0.0, min=low, max=high, step=0.01,
                                          tooltip=f"{control.tooltip}. Valid {control.low:g}..{control.high:g}: "
                                                  "results beyond are clamped (with a warning)"))
        return io.Schema(
            node_id="ExpressionAdaptersFlameExpressionEditor",
            display_name="FLAME Expression Editor",
            category=f"{CATEGORY}/edit",
            description="Edits a FLAME expression with named controls (jaw, eyelids, the leading expression "
                        "components), starting from neutral or from a connected (extracted) expression.",
            inputs=[
                FlameExpressionType.Input("base", optional=True,
                                          tooltip="Expression to start from (any number of rows); neutral if none"),
                io.Combo.Input("mode", options=["offset", "set"], default="offset",
                               tooltip="offset: add each slider to the base (0 keeps it); set: every slider "
                                       "replaces the base's value"),
                *sliders,
            ],
            outputs=[FlameExpressionType.Output(display_name="expression")],
        )

    @classmethod
    def execute(cls, mode, base=None, **controls):
        check_numbers(cls, **controls)
        return io.NodeOutput(edit_flame(base, mode=mode, controls=controls))


class ArkitBlendshapeEditor(io.ComfyNode):
    NAMES = ARKIT_BLENDSHAPE_NAMES[1:]  # "_neutral" is MediaPipe's score of no expression, not a control

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersArkitBlendshapeEditor",
            display_name="ARKit Blendshape Editor",
            category=f"{CATEGORY}/edit",
            description="Edits MediaPipe's ARKit-style blendshape scores (0..1) by name; Left/Right are the "
                        "subject's sides.",
            inputs=[
                ARKIT.input("base", optional=True, tooltip="Blendshapes to start from; zeros if none"),
                io.Combo.Input("mode", options=["offset", "set"], default="offset",
                               tooltip="offset: add each slider to the base (0 keeps it); set: every slider "
                                       "replaces the base's score"),
                *[io.Float.Input(name, default=0.0, min=-1.0, max=1.0, step=0.01,
                                 tooltip=f"{name}: valid 0..1, results beyond are clamped (with a warning)")
                  for name in cls.NAMES],
            ],
            outputs=[ArkitBlendshapesType.Output(display_name="blendshapes")],
        )

    @classmethod
    def execute(cls, mode, base=None, **scores):
        check_numbers(cls, **scores)
        return io.NodeOutput(edit_blendshapes(ARKIT.read(base), scores=scores, mode=mode))


class ManualEmotion(io.ComfyNode):
    MODES = ("class", "valence_arousal", "class_with_valence_arousal")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersEmotion",
            display_name="Emotion (manual)",
            category=f"{CATEGORY}/edit",
            description="An emotion for FaceCrafter: a class at an intensity, or a point of the valence/arousal "
                        "circle (class probabilities then follow the nearest classes).",
            inputs=[
                io.Combo.Input("mode", options=list(cls.MODES), default="class",
                               tooltip="class: class + intensity (valence/arousal from the class); valence_arousal: "
                                       "the two sliders; class_with_valence_arousal: class + intensity, sliders "
                                       "for valence/arousal"),
                io.Combo.Input("emotion", options=list(EMOTION_CLASSES), default="Happy",
                               tooltip="The emotion class (modes class and class_with_valence_arousal)"),
                io.Float.Input("intensity", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Probability on the class; the rest goes to Neutral"),
                io.Float.Input("valence", default=0.0, min=-1.0, max=1.0, step=0.05, tooltip="Unpleasant -1 .. pleasant 1"),
                io.Float.Input("arousal", default=0.0, min=-1.0, max=1.0, step=0.05, tooltip="Calm -1 .. excited 1"),
            ],
            outputs=[EmotionType.Output(display_name="emotion")],
        )

    @classmethod
    def execute(cls, mode, emotion, intensity, valence, arousal):
        check_numbers(cls, intensity=intensity, valence=valence, arousal=arousal)
        if mode == "valence_arousal":
            return io.NodeOutput(emotion_from_valence_arousal(valence, arousal))
        if mode == "class_with_valence_arousal":
            return io.NodeOutput(emotion_from_class(emotion, intensity, valence=valence, arousal=arousal))
        if mode != "class":
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(cls.MODES)}")
        return io.NodeOutput(emotion_from_class(emotion, intensity))


# --- operations on any kind, one node per kind ---------------------------------------------------------

class PerKindNode(io.ComfyNode):
    """Base of the generated per-kind nodes (never registered itself): ``kind`` is set on each generated
    subclass; ``op`` (node id part), ``title`` (display name) and ``category`` on each operation."""

    kind: Kind = FLAME
    op = ""
    title = ""
    category = ""

    @classmethod
    def kind_schema(cls, description: str, inputs: list, output_tooltip: str | None = None) -> io.Schema:
        return io.Schema(
            node_id=f"ExpressionAdapters{cls.op}{cls.kind.key}",
            display_name=f"{cls.title} ({cls.kind.key})",
            category=f"{CATEGORY}/{cls.category}",
            description=description,
            inputs=inputs,
            outputs=[cls.kind.socket.Output(display_name=cls.kind.name, tooltip=output_tooltip)],
        )


class Neutralize(PerKindNode):
    op, title, category = "Neutralize", "Neutralize", "edit"
    FLAME_PARTS = {"components": "expression", "eyelids": "eyelids", "jaw": "jaw"}  # toggle -> library part

    @classmethod
    def define_schema(cls):
        parts = [io.Boolean.Input(toggle, default=True, tooltip=f"Neutralize the FLAME {part} parameters")
                 for toggle, part in cls.FLAME_PARTS.items()] if cls.kind is FLAME else []
        return cls.kind_schema("Moves an expression towards neutral (FLAME zeros, blendshapes zeros, emotion Neutral "
                               "with valence = arousal = 0).", [
            cls.kind.input(cls.kind.name, tooltip="The value to move towards neutral (any number of rows)"),
            io.Float.Input("amount", default=1.0, min=0.0, max=1.0, step=0.05, tooltip="0 unchanged, 1 fully neutral"),
            *parts,
        ])

    @classmethod
    def execute(cls, amount, **inputs):
        check_numbers(cls, amount=amount)
        value = cls.kind.read(inputs[cls.kind.name])
        parts = [part for toggle, part in cls.FLAME_PARTS.items() if inputs.get(toggle, True)]
        return io.NodeOutput(neutralize(value, amount, parts=None if len(parts) == 3 else parts))


class Interpolate(PerKindNode):
    op, title, category = "Interpolate", "Expression Interpolate", "animate"

    @classmethod
    def define_schema(cls):
        return cls.kind_schema("A batch of frames going from start to end along an easing curve (frame 0 is start, "
                          "the last is end): feed it to a batch of latents of the same size.", [
            cls.kind.input("start", tooltip="Where the animation starts (one row)"),
            cls.kind.input("end", tooltip="Where the animation ends (one row)"),
            io.Int.Input("frames", default=16, min=1, max=MAX_ROWS, tooltip="Number of frames (rows) to make"),
            io.Combo.Input("easing", options=list(EASINGS), default="linear",
                           tooltip="ease_in starts slowly, ease_out ends slowly, ease_in_out both"),
        ], output_tooltip="One row per frame")

    @classmethod
    def execute(cls, start, end, frames, easing):
        check_numbers(cls, frames=frames)
        return io.NodeOutput(interpolate_frames(cls.kind.read(start), cls.kind.read(end), frames, easing))


class Keyframes(PerKindNode):
    op, title, category = "Keyframes", "Expression Keyframes", "animate"

    @classmethod
    def define_schema(cls):
        return cls.kind_schema("A batch of frames through keyframes: row k of the input sits at the k-th frame number; "
                          "frames before the first and after the last hold still. Join rows with Expression Batch.", [
            cls.kind.input("keyframes", tooltip="K rows, one per keyframe"),
            io.String.Input("frames", default="0, 15", tooltip="K frame numbers, comma-separated, e.g. 0, 12, 30"),
            io.Int.Input("length", default=16, min=1, max=MAX_ROWS, tooltip="Number of frames (rows) to make"),
            io.Combo.Input("easing", options=list(EASINGS), default="linear", tooltip="Easing of each segment"),
        ], output_tooltip="One row per frame")

    @classmethod
    def execute(cls, keyframes, frames, length, easing):
        check_numbers(cls, length=length)
        return io.NodeOutput(keyframes_from_rows(cls.kind.read(keyframes), frames, length, easing))


class Smooth(PerKindNode):
    op, title, category = "Smooth", "Expression Smooth", "animate"

    @classmethod
    def define_schema(cls):
        return cls.kind_schema("Smooths per-frame values over time (rows in frame order), e.g. from a video, "
                          "against jitter.", [
            cls.kind.input(cls.kind.name, tooltip="One row per frame"),
            io.Combo.Input("method", options=list(SMOOTHING_METHODS), default="ema",
                           tooltip="ema: exponential moving average both ways (no lag); moving_average: box of "
                                   "'window' frames; savgol: Savitzky-Golay polynomial (keeps peaks)"),
            io.Float.Input("strength", default=0.5, min=0.0, max=0.99, step=0.01,
                           tooltip="ema: share of the running value kept per frame (0 = no smoothing)"),
            io.Int.Input("window", default=5, min=1, max=101, step=2, tooltip="moving_average / savgol: odd number of frames"),
            io.Int.Input("order", default=2, min=0, max=6, tooltip="savgol: polynomial degree"),
        ])

    @classmethod
    def execute(cls, method, strength, window, order, **inputs):
        check_numbers(cls, strength=strength, window=window, order=order)
        return io.NodeOutput(smooth_sequence(cls.kind.read(inputs[cls.kind.name]), method, strength, window, order))


class Batch(PerKindNode):
    op, title, category = "Batch", "Expression Batch", "animate"

    @classmethod
    def define_schema(cls):
        return cls.kind_schema("Joins values into one batch, rows in input order (keyframes, or per-image values).", [
            cls.kind.input("first", tooltip="Rows that come first"),
            cls.kind.input("second", tooltip="Rows that follow"),
            cls.kind.input("third", optional=True, tooltip="Optional: rows after the second"),
            cls.kind.input("fourth", optional=True, tooltip="Optional: rows after the third"),
        ])

    @classmethod
    def execute(cls, first, second, third=None, fourth=None):
        values = [cls.kind.read(value) for value in (first, second, third, fourth) if value is not None]
        return io.NodeOutput(cls.kind.value_type.concat(values))


class LoadPreset(PerKindNode):
    op, title, category = "LoadPreset", "Load Expression Preset", "presets"

    @classmethod
    def define_schema(cls):
        return cls.kind_schema(f"A saved (or built-in) {cls.kind.value_type.kind} preset from the user folder "
                          "expression_adapters/presets (JSON).", [
            io.Combo.Input("preset", options=list_presets(presets_folder(), cls.kind.value_type) or ["neutral"],
                           tooltip="Built-in presets first, then yours"),
        ])

    @classmethod
    def fingerprint_inputs(cls, preset):
        path = os.path.join(presets_folder(), cls.kind.value_type.kind, f"{preset}.json")
        return os.path.getmtime(path) if os.path.isfile(path) else preset

    @classmethod
    def execute(cls, preset):
        check_choices(cls, preset=preset)
        return io.NodeOutput(load_preset(presets_folder(), preset, cls.kind.value_type))


def per_kind(base: type[PerKindNode], kinds=ALL_KINDS) -> list[type[PerKindNode]]:
    return [type(f"{base.__name__}{kind.key}", (base,), {"kind": kind, "__module__": __name__}) for kind in kinds]


class SavePreset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersSavePreset",
            display_name="Save Expression Preset",
            category=f"{CATEGORY}/presets",
            description="Saves a FLAME expression, blendshapes or emotion as JSON in the user folder "
                        "expression_adapters/presets/<kind>/<name>.json (load it with Load Expression Preset).",
            inputs=[
                io.MultiType.Input("value", types=[kind.socket for kind in PRESET_KINDS],
                                   tooltip="A FLAME expression, blendshapes or an emotion (all rows are saved)"),
                io.String.Input("name", default="my_expression",
                                tooltip="Letters, digits, spaces, '_', '-', '.'; no folders"),
                io.Boolean.Input("overwrite", default=True, tooltip="Replace a preset of the same name"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, value, name, overwrite):
        if not isinstance(value, tuple(kind.value_type for kind in PRESET_KINDS)):
            raise TypeError(f"Save Expression Preset takes a FLAME expression, blendshapes or an emotion; got "
                            f"{type(value).__name__}")
        path = save_preset(value, presets_folder(), name, overwrite=overwrite)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path}"))


# --- preview charts -------------------------------------------------------------------------------------

class BlendshapeChart(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersBlendshapeChart",
            display_name="Blendshape Chart",
            category=f"{CATEGORY}/previews",
            description="Bar chart of the 52 blendshape scores, one image per row.",
            inputs=[ARKIT.input("blendshapes", tooltip="One chart per row"),
                    io.Int.Input("width", default=512, min=256, max=2048, tooltip="Chart width in pixels")],
            outputs=[io.Image.Output(display_name="chart")],
        )

    @classmethod
    def execute(cls, blendshapes, width):
        check_numbers(cls, width=width)
        return io.NodeOutput(blendshape_chart(ARKIT.read(blendshapes), width=width))


class FlameChart(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersFlameChart",
            display_name="FLAME Chart",
            category=f"{CATEGORY}/previews",
            description="Bars of the 55 FLAME parameters (expression, eyelids, jaw), one image per row.",
            inputs=[
                FlameExpressionType.Input("expression", tooltip="One chart per row"),
                io.Int.Input("width", default=768, min=300, max=2048, tooltip="Chart width in pixels"),
                io.Int.Input("height", default=300, min=120, max=1024, tooltip="Chart height in pixels"),
                io.Float.Input("limit", default=0.0, min=0.0, max=20.0, step=0.5,
                               tooltip="Expression axis +-limit; 0 = max(3, largest value)"),
            ],
            outputs=[io.Image.Output(display_name="chart")],
        )

    @classmethod
    def execute(cls, expression, width, height, limit):
        check_numbers(cls, width=width, height=height, limit=limit)
        return io.NodeOutput(flame_chart(expression, width=width, height=height, limit=limit or None))


class EmotionChart(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersEmotionChart",
            display_name="Emotion Chart",
            category=f"{CATEGORY}/previews",
            description="Class probabilities as bars and valence/arousal on a circle, one image per row.",
            inputs=[
                EmotionType.Input("emotion", tooltip="One chart per row"),
                io.Int.Input("width", default=512, min=256, max=2048, tooltip="Chart width in pixels"),
                io.Int.Input("height", default=220, min=120, max=1024, tooltip="Chart height in pixels"),
            ],
            outputs=[io.Image.Output(display_name="chart")],
        )

    @classmethod
    def execute(cls, emotion, width, height):
        check_numbers(cls, width=width, height=height)
        return io.NodeOutput(emotion_chart(emotion, width=width, height=height))


NODES = [
    FlameExpressionEditor, ArkitBlendshapeEditor, ManualEmotion, *per_kind(Neutralize, PRESET_KINDS),
    *per_kind(Interpolate), *per_kind(Keyframes), *per_kind(Smooth), *per_kind(Batch),
    SavePreset, *per_kind(LoadPreset, PRESET_KINDS),
    BlendshapeChart, FlameChart, EmotionChart,
]
