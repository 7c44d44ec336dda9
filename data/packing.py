"""Packing one component's tokenized documents into rows of seq_len (Grain packers), and the row format.

- concat_then_split (default): documents are concatenated and cut at row ends, so rows have no padding (except the
  last row of a finite stream) and a long document simply continues in the next row(s).
- first_fit: whole documents are packed first-fit into `packing_bins` open rows; a document longer than seq_len is
  first split into consecutive seq_len chunks, each packed like a document.
In both, `positions` restart at 0 for every segment of a row, including a continued document's piece: a row is an
independent context, so positions never exceed seq_len - 1. `truncate=True` keeps only each document's first seq_len
tokens instead of splitting it.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from data.config import Component

FEATURES = ("tokens", "weights", "doc_pos")


class _Chunk(grain.experimental.FlatMapTransform):
    """Splits a document into consecutive pieces of at most seq_len tokens (or keeps the first when truncating)."""

    def __init__(self, seq_len: int, truncate: bool):
        self.seq_len = seq_len
        self.truncate = truncate
        self.max_fan_out = 1 if truncate else 1 << 20

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = len(element["tokens"])
        if n <= self.seq_len:
            return [element]
        starts = [0] if self.truncate else range(0, n, self.seq_len)
        return [{k: v[s:s + self.seq_len] for k, v in element.items()} for s in starts]


def pack_rows(docs: grain.IterDataset, component: Component, seq_len: int, seed: int) -> grain.IterDataset:
    """docs: dicts of tokens/weights/doc_pos [n] -> rows of tokens, segment_ids, positions, loss_mask [seq_len]
    plus `_documents` (number of documents that start in the row)."""
    lengths = {k: seq_len for k in FEATURES}
    if component.packing == "first_fit" or component.truncate:
        docs = grain.experimental.FlatMapIterDataset(docs, _Chunk(seq_len, component.truncate))
    if component.packing == "first_fit":
        rows = grain.experimental.FirstFitPackIterDataset(
            docs, length_struct=lengths, num_packing_bins=component.packing_bins, seed=seed, shuffle_bins=False)
    else:
        rows = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct=lengths,
                                                             split_full_length_features=True)
    return rows.map(finalize_row)


def finalize_row(packed: dict[str, Any]) -> dict[str, Any]:
    """Grain's packed features -> the batch row format (see docs/design.md)."""
    seg = np.asarray(packed["tokens_segment_ids"], dtype=np.int32)
    starts = np.flatnonzero((seg > 0) & np.concatenate([[True], seg[1:] != seg[:-1]]))
    return {
        "tokens": np.asarray(packed["tokens"], dtype=np.int32),
        "segment_ids": seg,
        "positions": np.asarray(packed["tokens_positions"], dtype=np.int32),
        "loss_mask": np.where(seg > 0, packed["weights"], 0).astype(np.float32),
        "_documents": int(np.count_nonzero(np.asarray(packed["doc_pos"])[starts] == 0)),
    }
