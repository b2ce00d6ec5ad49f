"""Work a prompt can ask for stays bounded (issue 22): rows read from text or files, and chart pixels.

20,000 FLAME rows typed as JSON once became 55 GB of preview PNGs; 4,096 interpolated frames charted at
2,048 x 1,024 asked for a 103 GB tensor. Text and files give at most MAX_ROWS rows (Interpolate's most
frames); a chart node draws at most MAX_CHART_PIXELS, the first rows that fit, and says so in the log.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from encoders.expression_edit import keyframes_from_rows, load_preset, save_preset
from encoders.expressions import MAX_JSON_CHARS, MAX_ROWS, ArkitBlendshapes, Emotion, FlameExpression
from encoders.previews import MAX_CHART_PIXELS, blendshape_chart, emotion_chart, flame_chart


def rows_json(rows: int, width: int = 55) -> str:
    return json.dumps({"kind": "flame_expression", "values": [[0.0] * width] * rows})


def test_json_gives_at_most_max_rows():
    assert len(FlameExpression.from_json(rows_json(MAX_ROWS))) == MAX_ROWS
    with pytest.raises(ValueError, match=rf"flame_expression: {MAX_ROWS + 1} rows; at most {MAX_ROWS} are read"):
        FlameExpression.from_json(rows_json(MAX_ROWS + 1))
    with pytest.raises(ValueError, match=r"characters of JSON; at most"):
        FlameExpression.from_json(" " * (MAX_JSON_CHARS + 1) + "[]")


def test_a_preset_file_gives_at_most_max_rows(tmp_path):
    folder = tmp_path / "flame_expression"
    folder.mkdir()
    (folder / "huge.json").write_text(rows_json(MAX_ROWS + 1))
    with pytest.raises(ValueError, match=rf"huge.json: flame_expression: {MAX_ROWS + 1} rows"):
        load_preset(tmp_path, "huge", FlameExpression)
    save_preset(FlameExpression.neutral(), tmp_path, "fine")
    assert len(load_preset(tmp_path, "fine", FlameExpression)) == 1


def test_keyframe_frame_lists_are_bounded():
    keys = FlameExpression(torch.zeros(2, 55))
    assert len(keyframes_from_rows(keys, "0, 9", 10)) == 10
    with pytest.raises(ValueError, match=rf"{MAX_ROWS + 1} frame numbers; at most {MAX_ROWS} keyframes"):
        keyframes_from_rows(keys, ", ".join(["1"] * (MAX_ROWS + 1)), 10)


@pytest.mark.parametrize(("chart", "value", "size"), [
    (flame_chart, FlameExpression(torch.zeros(MAX_ROWS, 55)), {"width": 2048, "height": 1024}),
    (emotion_chart, Emotion(torch.zeros(MAX_ROWS, 10)), {"width": 2048, "height": 1024}),
    (blendshape_chart, ArkitBlendshapes(torch.zeros(MAX_ROWS, 52)), {"width": 2048}),
], ids=["flame", "emotion", "blendshapes"])
def test_charts_draw_the_rows_that_fit_the_pixel_budget(chart, value, size, caplog):
    with caplog.at_level(logging.WARNING):
        images = chart(value, **size)
    height, width = images.shape[1:3]
    fits = MAX_CHART_PIXELS // (width * height)
    assert images.shape[0] == fits < MAX_ROWS and images.numel() // 3 <= MAX_CHART_PIXELS
    assert f"drawing the first {fits} of {MAX_ROWS} rows" in caplog.text
    small = chart(type(value)(value.values[:3]), **size)
    assert small.shape[0] == 3 and torch.equal(small, images[:3])
