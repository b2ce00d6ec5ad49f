"""Refusing bad widget values at the node, before they reach a model or the disk.

Through the API a FLOAT input can be NaN (Python's JSON reader accepts it) and ComfyUI's min/max check
lets it through; a NaN strength then gives a black image and a NaN in the history. Every node with
number inputs calls :func:`check_numbers` first; the allowed range is the widget's own (its schema).

ComfyUI 0.3.64 does not check a V3 combo's value against its options either, so a loader's file name
could be any string (an absolute path, ``../..``); every node whose combos name files calls
:func:`check_choices` first, against the options its schema lists now (newer ComfyUI checks the same).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..encoders.checks import finite_number
from .model_folders import unreadable_file_error


def check_numbers(node: type[io.ComfyNode], **values) -> None:
    """Raise ValueError (naming the node and input) unless each INT/FLOAT input in ``values`` is finite and
    within its widget's min..max; inputs that are not numbers in the schema are ignored."""
    schema = node.define_schema()  # not GET_SCHEMA: inside execute the class is ComfyUI's locked clone
    for spec in schema.inputs:
        if spec.id in values and isinstance(spec, (io.Float.Input, io.Int.Input)):
            finite_number(f"{schema.display_name}: {spec.id}", values[spec.id], spec.min, spec.max)


def check_choices(node: type[io.ComfyNode], folders: dict[str, str] | None = None, **values) -> None:
    """Raise ValueError (naming the node and input) unless each combo input in ``values`` is one of the options
    its schema lists now. The refused value is shown shortened, never as a place to put a file. ``folders``
    ({input: model folder}): a file there that the list leaves out because it cannot be read is named with why."""
    schema = node.define_schema()
    for spec in schema.inputs:
        if spec.id in values and isinstance(spec, io.Combo.Input) and values[spec.id] not in spec.options:
            if spec.id in (folders or {}):
                unreadable_file_error(folders[spec.id], values[spec.id])
            shown = repr(str(values[spec.id])[:60])
            listed = ", ".join(map(str, spec.options[:6])) + (", ..." if len(spec.options) > 6 else "")
            raise ValueError(f"{schema.display_name}: {spec.id} {shown} is not one of its choices ({listed}); pick one "
                             "in the node (refresh the page after adding files to the models folder)")
