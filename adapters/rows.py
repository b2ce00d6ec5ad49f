"""Which rows of a guided attention batch get what: the layout every host shares.

A guided batch stacks equal chunks, one per prediction. ComfyUI names each chunk's prediction in
``cond_or_uncond`` (0 the positive, 1 the negative; guiders with more predictions send indices
0..n-1, in any order; only ``[0]`` at CFG 1). Inside a chunk, row ``i`` is image ``i`` of the
batch, or, under context windows, image ``frames[i]`` of the whole batch.

Which chunks are *conditional* (adapters act on them) is ComfyUI's rule, index ``COND``, unless the
guider says otherwise: a guider whose indices mean something else (the FaceCrafter Guider: 0 the
negative, 1..3 positives) puts ``{index: conditional}`` in ``transformer_options[CONDITIONAL_KEY]``,
and every adapter asks :meth:`RowLayout.conditional` instead of comparing with ``COND``.

Adapters give their per-image inputs (expression tokens, reference features) once for the whole
batch or once per image; :meth:`RowLayout.per_image` picks the rows a chunk needs, and
:meth:`RowLayout.stack` / :meth:`RowLayout.scales` lay out rows and per-row scales chunk by chunk
from the chunk's prediction index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

COND, UNCOND = 0, 1  # the values ComfyUI puts in transformer_options["cond_or_uncond"]
# transformer_options entry: {chunk index: is that prediction conditional}, set by guiders with other indices
CONDITIONAL_KEY = "expression_adapters_conditional"


class RowLayout:
    """The chunks of a batch of ``batch`` rows: their prediction indices, size and (context window) frames.

    ``conditional``: {prediction index: conditional or not} from the guider (:data:`CONDITIONAL_KEY`);
    without it index ``COND`` is the conditional one.
    """

    def __init__(self, batch: int, cond_or_uncond: Sequence[int] | None = None, frames: Sequence[int] | None = None,
                 conditional: Mapping[int, bool] | None = None):
        self.chunks = tuple(int(index) for index in (cond_or_uncond or [COND]))
        self._conditional = None if conditional is None else {int(index): bool(on) for index, on in conditional.items()}
        if self._conditional is not None and not set(self.chunks) <= set(self._conditional):
            missing = sorted(set(self.chunks) - set(self._conditional))
            raise ValueError(f"prediction indices {missing} are not in the guider's conditional map {self._conditional}")
        if batch % len(self.chunks):
            raise ValueError(f"a batch of {batch} rows does not split into {len(self.chunks)} equal chunks {list(self.chunks)}")
        self.batch = batch
        self.chunk_size = batch // len(self.chunks)
        self.frames = None if frames is None else tuple(int(frame) for frame in frames)
        if self.frames is not None and len(self.frames) != self.chunk_size:
            raise ValueError(f"the context window lists {len(self.frames)} frames but each chunk has {self.chunk_size} rows")

    @classmethod
    def of(cls, batch: int, transformer_options: Mapping) -> RowLayout:
        """The layout ComfyUI describes in ``transformer_options`` (or an attention patch's ``extra_options``)."""
        return cls(batch, transformer_options.get("cond_or_uncond"), context_window_frames(transformer_options),
                   transformer_options.get(CONDITIONAL_KEY))

    @property
    def key(self) -> tuple:
        """What tells layouts apart, for caches."""
        return self.chunks, self.chunk_size, self.frames, tuple(map(self.conditional, self.chunks))

    def conditional(self, index: int) -> bool:
        """Whether prediction ``index`` is conditional: adapters add their condition there, their
        unconditional input (or nothing) elsewhere."""
        return index == COND if self._conditional is None else self._conditional[index]

    @property
    def conditional_chunks(self) -> int:
        return sum(map(self.conditional, self.chunks))

    def conditional_mask(self) -> torch.Tensor:
        """A CPU bool per row: True for the rows of conditional chunks."""
        return self.mask(index for index in self.chunks if self.conditional(index))

    def chunk_rows(self, position: int) -> slice:
        return slice(position * self.chunk_size, (position + 1) * self.chunk_size)

    def mask(self, indices: Iterable[int]) -> torch.Tensor:
        """A CPU bool per row: True for the rows of chunks whose prediction index is in ``indices``."""
        wanted = set(indices)
        return torch.tensor([index in wanted for index in self.chunks]).repeat_interleave(self.chunk_size)

    def per_image(self, rows: torch.Tensor, what: str = "the input") -> torch.Tensor:
        """``rows`` (one row, or one per image of the whole batch) as the ``chunk_size`` rows of one chunk."""
        count = rows.shape[0]
        if count == 1:
            return rows.expand(self.chunk_size, *rows.shape[1:])
        if self.frames is not None:
            if max(self.frames) >= count:
                raise ValueError(f"{what} has {count} rows but the context window asks for image {max(self.frames) + 1}: "
                                 "give one row for the whole batch or one per image")
            return rows[list(self.frames)]
        if count != self.chunk_size:
            raise ValueError(f"{what} has {count} rows but the batch has {self.chunk_size} images: "
                             "give one row for the whole batch or one per image")
        return rows

    def stack(self, rows_for: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """The whole batch: chunk by chunk, ``rows_for(prediction index)`` (``chunk_size`` rows each)."""
        return torch.cat([rows_for(index) for index in self.chunks])

    def scales(self, scale_for: Mapping[int, float] | Callable[[int], float], default: float = 0.0) -> torch.Tensor:
        """A float per row (CPU): the scale of its chunk's prediction index (``default`` where a mapping has none)."""
        pick = scale_for if callable(scale_for) else (lambda index: scale_for.get(index, default))
        return torch.tensor([float(pick(index)) for index in self.chunks]).repeat_interleave(self.chunk_size)


def context_window_frames(transformer_options: Mapping) -> list[int] | None:
    """The frames of the context window being computed (ComfyUI's ``context_window.index_list``), if any."""
    window = transformer_options.get("context_window")
    return None if window is None else list(window.index_list)
