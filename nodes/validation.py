"""Refusing NaN, infinite and out-of-range numbers at the node, before they reach a model.

Through the API a FLOAT input can be NaN (Python's JSON reader accepts it) and ComfyUI's min/max check
lets it through; a NaN strength then gives a black image and a NaN in the history. Every node with
number inputs calls :func:`check_numbers` first; the allowed range is the widget's own (its schema).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..encoders.checks import finite_number


def check_numbers(node: type[io.ComfyNode], **values) -> None:
    """Raise ValueError (naming the node and input) unless each INT/FLOAT input in ``values`` is finite and
    within its widget's min..max; inputs that are not numbers in the schema are ignored."""
    schema = node.define_schema()  # not GET_SCHEMA: inside execute the class is ComfyUI's locked clone
    for spec in schema.inputs:
        if spec.id in values and isinstance(spec, (io.Float.Input, io.Int.Input)):
            finite_number(f"{schema.display_name}: {spec.id}", values[spec.id], spec.min, spec.max)
