"""The row layout every host shares (adapters/rows.py), the shared reference read, and the library's one
weight-file reader. Expectations are written out by hand."""

from __future__ import annotations

import pytest
import torch

from adapters.attention import multi_head_attention
from adapters.reference import attend_with_reference
from adapters.rows import COND, CONDITIONAL_KEY, UNCOND, RowLayout, context_window_frames


def test_chunks_follow_cond_or_uncond_in_any_order():
    layout = RowLayout(6, [UNCOND, COND])
    assert layout.chunks == (1, 0) and layout.chunk_size == 3
    assert layout.mask({COND}).tolist() == [False] * 3 + [True] * 3
    assert RowLayout(2).chunks == (COND,) and RowLayout(2, []).mask({COND}).tolist() == [True, True]  # CFG 1
    with pytest.raises(ValueError, match="does not split into 2 equal chunks"):
        RowLayout(3, [1, 0])


def test_per_image_rows_one_for_all_one_per_image_or_the_context_windows_frames():
    rows = torch.arange(4.0)[:, None]
    assert RowLayout(8, [1, 0]).per_image(rows).flatten().tolist() == [0, 1, 2, 3]
    assert RowLayout(8, [1, 0]).per_image(rows[:1]).flatten().tolist() == [0, 0, 0, 0]
    windowed = RowLayout(4, [1, 0], frames=[2, 3])
    assert windowed.per_image(rows).flatten().tolist() == [2, 3]
    with pytest.raises(ValueError, match="the expression has 4 rows but the batch has 2 images"):
        RowLayout(4, [1, 0]).per_image(rows, "the expression")
    with pytest.raises(ValueError, match="asks for image 6"):
        RowLayout(2, [0], frames=[4, 5]).per_image(rows)


def test_rows_and_scales_per_chunk_index_for_a_four_prediction_guider():
    layout = RowLayout(8, [2, 0, 3, 1])  # FaceCrafter's guider: uncond, ID, ID+LMK, ID+EMO in any order
    stacked = layout.stack(lambda index: torch.full((2, 1), float(index)))
    assert stacked.flatten().tolist() == [2, 2, 0, 0, 3, 3, 1, 1]
    assert layout.scales({2: 0.5, 3: 1.0}).tolist() == [0.5, 0.5, 0, 0, 1, 1, 0, 0]
    assert layout.scales(lambda index: index / 10).tolist() == pytest.approx([0.2, 0.2, 0, 0, 0.3, 0.3, 0.1, 0.1])


def test_conditional_chunks_follow_comfyuis_rule_or_the_guiders_map():
    plain = RowLayout(4, [UNCOND, COND])
    assert [plain.conditional(index) for index in (COND, UNCOND)] == [True, False]
    assert plain.conditional_mask().tolist() == [False, False, True, True] and plain.conditional_chunks == 1
    # the FaceCrafter Guider: 0 is the negative, 1..3 positives, batched in any order
    guided = RowLayout(8, [2, 0, 3, 1], conditional={0: False, 1: True, 2: True, 3: True})
    assert guided.conditional_mask().tolist() == [True, True, False, False, True, True, True, True]
    assert guided.conditional_chunks == 3 and not guided.conditional(0)
    negative_only = RowLayout(2, [0], conditional={0: False, 1: True})
    assert negative_only.conditional_mask().tolist() == [False, False] and negative_only.conditional_chunks == 0
    # caches keyed by layout tell the two readings of chunk 0 apart
    assert RowLayout(2, [0]).key != negative_only.key
    with pytest.raises(ValueError, match=r"prediction indices \[4\] are not in the guider's conditional map"):
        RowLayout(4, [4, 0], conditional={0: False, 1: True})


def test_layout_is_read_from_transformer_options():
    class Window:
        index_list = [5, 6]

    options = {"cond_or_uncond": [1, 0], "context_window": Window(), CONDITIONAL_KEY: {0: False, 1: True}}
    layout = RowLayout.of(4, options)
    assert layout.chunks == (1, 0) and layout.frames == (5, 6)
    assert layout.conditional_mask().tolist() == [True, True, False, False]
    assert RowLayout.of(4, {"cond_or_uncond": [1, 0]}).conditional_mask().tolist() == [False, False, True, True]


def test_context_window_frames_are_read_from_transformer_options():
    class Window:
        index_list = [4, 5, 6]

    assert context_window_frames({"context_window": Window()}) == [4, 5, 6]
    assert context_window_frames({}) is None


def test_reference_rows_attend_to_their_tokens_then_the_references():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 5, 8, generator=generator) for _ in range(3))
    reference_k, reference_v = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 3, 8, generator=generator)
    reads = RowLayout(4, [UNCOND, COND]).mask({COND})
    seen = []

    def attention(q, k, v, reading):
        seen.append((q.shape[0], k.shape[1], reading))
        return multi_head_attention(q, k, v, 2)

    out = attend_with_reference(q, k, v, reads, reference_k, reference_v, attention)
    assert sorted(seen) == [(2, 5, False), (2, 8, True)]
    torch.testing.assert_close(out[:2], multi_head_attention(q[:2], k[:2], v[:2], 2))
    for row, reference in ((2, 0), (3, 1)):
        expected = multi_head_attention(q[row:row + 1], torch.cat([k[row], reference_k[reference]])[None],
                                        torch.cat([v[row], reference_v[reference]])[None], 2)
        torch.testing.assert_close(out[row:row + 1], expected)


def test_one_weight_file_reader_serves_adapters_and_encoders():
    from adapters import checkpoints
    from encoders import weight_files

    assert weight_files.read_checkpoint is checkpoints.read_checkpoint
