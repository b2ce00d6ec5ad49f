"""Checks on numbers people type or send (widgets, the API, JSON values): finite and in range, with a
message that names the input. ComfyUI's own validation compares with the widget's min/max, which a NaN
passes (every comparison with NaN is false), and it never sees numbers inside text such as a JSON list."""

from __future__ import annotations

import math


def finite_number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is a finite number within [low, high]; else ValueError naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}") from None
    span = f" between {low:g} and {high:g}" if low is not None and high is not None else ""
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{span}; got {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must lie{span or ' in range'}; got {number:g}")
    return number


def rows_text(rows) -> str:
    """Batch rows (0-based indices) as people count them: 'row 3' or 'rows 1, 4'."""
    rows = [int(row) + 1 for row in rows]
    return f"row {rows[0]}" if len(rows) == 1 else "rows " + ", ".join(map(str, rows))
