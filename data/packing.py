"""Packing one component's tokenized documents into rows of seq_len, as checkpointable Grain iterators.

- concat_then_split (default): documents are concatenated and cut at row ends, so rows have no padding (except the
  last row of a finite stream) and a long document continues in the next row(s).
- first_fit: documents are packed whole, first-fit, into `packing_bins` open rows; when a piece fits in no open row,
  all open rows are emitted (in order) and packing restarts with that piece. A document longer than seq_len is first
  split into consecutive seq_len chunks, each packed like a document, so nothing is dropped.
`truncate=True` keeps only each document's first seq_len tokens instead. In both packers `positions` restart at 0 for
every segment of a row, including a continued document's piece: a row is an independent context, so positions stay
below seq_len.

The packers read documents by index from a random-access `MapDataset` (see data.pipeline.EpochMapDataset), so their
state is a few integers: (document index, token offset) for concat-then-split, (first piece of the open window, rows
already emitted from it) for first-fit, which re-packs that one window on restore.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from data.config import Component


class PackedRowsIterDataset(grain.IterDataset):
    """docs[i] = {"tokens", "weights", "doc_pos"} [n_i] -> rows {tokens, segment_ids, positions, loss_mask} [seq_len]
    plus `_documents` (how many documents start in the row)."""

    def __init__(self, docs: grain.MapDataset, component: Component, seq_len: int):
        super().__init__()
        self._docs = docs
        self._component = component
        self._seq_len = seq_len

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Grain worker processes (`mp_prefetch`) each pack a disjoint slice of the document stream."""
        del sequential_slice  # the document stream is infinite or epoch-ordered; strided slices keep it disjoint
        self._docs = self._docs[sl]

    def __iter__(self) -> grain.DatasetIterator:
        cls = _FirstFitIterator if self._component.packing == "first_fit" else _ConcatSplitIterator
        return cls(self._docs, self._component, self._seq_len)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset({self._component.name}, {self._component.packing}, seq_len={self._seq_len})"


class _RowBuilder:
    """Accumulates document pieces into one row."""

    def __init__(self, seq_len: int):
        self.tokens = np.zeros(seq_len, np.int32)
        self.segment_ids = np.zeros(seq_len, np.int32)
        self.positions = np.zeros(seq_len, np.int32)
        self.loss_mask = np.zeros(seq_len, np.float32)
        self.fill = 0
        self.segments = 0
        self.documents = 0

    def add(self, doc: dict[str, np.ndarray], start: int, stop: int) -> None:
        n = stop - start
        sl = slice(self.fill, self.fill + n)
        self.segments += 1
        self.tokens[sl] = doc["tokens"][start:stop]
        self.loss_mask[sl] = doc["weights"][start:stop]
        self.segment_ids[sl] = self.segments
        self.positions[sl] = np.arange(n, dtype=np.int32)
        self.documents += int(doc["doc_pos"][start] == 0)
        self.fill += n

    def row(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "segment_ids": self.segment_ids, "positions": self.positions,
                "loss_mask": self.loss_mask, "_documents": self.documents}


def _length(doc: dict[str, np.ndarray], seq_len: int, truncate: bool) -> int:
    n = len(doc["tokens"])
    return min(n, seq_len) if truncate else n


class _ConcatSplitIterator(grain.DatasetIterator):
    def __init__(self, docs: grain.MapDataset, component: Component, seq_len: int):
        super().__init__()
        self._docs, self._seq_len, self._truncate = docs, seq_len, component.truncate
        self._index, self._offset = 0, 0
        self._current: dict[str, np.ndarray] | None = None

    def __next__(self) -> dict[str, Any]:
        row = _RowBuilder(self._seq_len)
        while row.fill < self._seq_len:
            if self._current is None:
                if self._index >= len(self._docs):
                    break
                self._current = self._docs[self._index]
            n = _length(self._current, self._seq_len, self._truncate)
            stop = min(n, self._offset + self._seq_len - row.fill)
            if stop > self._offset:  # a document that tokenized to nothing adds no segment
                row.add(self._current, self._offset, stop)
            self._offset = stop
            if stop == n:
                self._index, self._offset, self._current = self._index + 1, 0, None
        if row.fill == 0:
            raise StopIteration
        return row.row()

    def get_state(self) -> dict[str, Any]:
        return {"index": self._index, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._index, self._offset, self._current = int(state["index"]), int(state["offset"]), None


class _FirstFitIterator(grain.DatasetIterator):
    def __init__(self, docs: grain.MapDataset, component: Component, seq_len: int):
        super().__init__()
        self._docs, self._seq_len, self._truncate = docs, seq_len, component.truncate
        self._bins = component.packing_bins
        self._window = (0, 0)  # (document index, chunk) of the window's first piece
        self._next_piece = (0, 0)
        self._rows: list[dict[str, Any]] = []
        self._emitted = 0

    def _pack_window(self) -> None:
        """Packs pieces from self._window on into at most `bins` rows; sets self._rows and self._next_piece."""
        builders: list[_RowBuilder] = []
        index, chunk = self._window
        while index < len(self._docs):
            doc = self._docs[index]
            n = _length(doc, self._seq_len, self._truncate)
            start = chunk * self._seq_len
            stop = min(n, start + self._seq_len)
            size = stop - start
            if size == 0:
                index, chunk = index + 1, 0
                continue
            target = next((b for b in builders if b.fill + size <= self._seq_len), None)
            if target is None:
                if len(builders) == self._bins:
                    break
                target = _RowBuilder(self._seq_len)
                builders.append(target)
            target.add(doc, start, stop)
            index, chunk = (index + 1, 0) if stop == n else (index, chunk + 1)
        self._rows = [b.row() for b in builders]
        self._next_piece = (index, chunk)

    def __next__(self) -> dict[str, Any]:
        if self._emitted >= len(self._rows):
            if self._rows:
                self._window, self._emitted = self._next_piece, 0
            self._pack_window()
            if not self._rows:
                raise StopIteration
        self._emitted += 1
        return self._rows[self._emitted - 1]

    def get_state(self) -> dict[str, Any]:
        return {"window": list(self._window), "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._window, self._emitted, self._rows = tuple(int(x) for x in state["window"]), int(state["emitted"]), []
        if self._emitted:
            self._pack_window()
