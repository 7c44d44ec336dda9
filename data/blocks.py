"""The mixture's block layout as arithmetic on row counts, without data: data.mixture draws its rows by it, and
MixtureConfig.check_run uses it to check a run before anything is read.

The rows of one data shard are cut into stretches at every stage start and at the run's end. Each stretch lays out
blocks from its first row, the last one cut short by the stretch's end, and a block of n rows holds exactly
`largest_remainder(shares, n)` rows of each component. When every share is a whole number of a full block's rows
(`block_rows` picks such a block when one fits), a stretch of any length therefore gives every component its
largest-remainder share of the stretch: a run shorter than one block is one block the size of the run.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WHOLE = 1e-6  # a share times a block is a whole number of rows when it is this close to one


def largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (Hamilton's method; ties go to the earlier index).

    weights: [C] non-negative, summing to 1. Returns int64 [C].
    """
    exact = np.asarray(weights, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def is_whole(shares: Sequence[float], block: int) -> bool:
    """Whether every share is a whole number of a `block`-row block's rows."""
    return all(abs(s * block - round(s * block)) < WHOLE for s in shares)


def block_rows(shares: Sequence[float], block_size: int) -> int:
    """Rows per full block for `shares` [C] (summing to 1): `block_size` when every share is a whole number of its
    rows, else the smallest block that makes them all whole, else (none up to `block_size`) `block_size`."""
    if is_whole(shares, block_size):
        return block_size
    return next((b for b in range(1, block_size) if is_whole(shares, b)), block_size)


def stretch_rows(shares: Sequence[float], rows: int, block: int) -> np.ndarray:
    """Rows of each component [C] in a stretch of `rows` rows laid out in blocks of `block` rows from its start."""
    full, rest = divmod(rows, block)
    return full * largest_remainder(shares, block) + largest_remainder(shares, rest)
