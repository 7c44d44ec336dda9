"""Block-deterministic token-share mixture of packed rows (Levanter-style), as a checkpointable Grain IterDataset.

Every row holds one component's tokens. Rows are grouped in blocks of `block_size`; in each block a component gets
exactly `largest_remainder(weight * block_size)` rows, in an order permuted with a seed derived from
(seed, shard, block anchor, block index). A component's rows are consumed in its own order, so the schedule (which
component fills global row r) is a pure function of the weights and r: it needs no data and never drifts.

Stages and resume: a schedule is a list of segments `(start_row, counts)`; blocks are laid out from the start of each
segment. When a checkpoint made under other weights is restored, the new weights take effect at the restored row as
a fresh segment (a new block grid anchored there); every component continues from its own saved position and
components new to the mixture start from their beginning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

import exit_codes

log = logging.getLogger(__name__)


class ComponentExhausted(RuntimeError):
    """A component with `on_exhausted="error"` ran past its `max_epochs`."""
    exit_code = exit_codes.STOPPED


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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which component fills each row of one data shard.

    segments: ((start_row, counts [C]), ...) with increasing start rows, the first at 0.
    """

    segments: tuple[tuple[int, tuple[int, ...]], ...]
    block_size: int
    seed: int
    shard: int

    @classmethod
    def from_weights(cls, stages: Sequence[tuple[int, Sequence[float]]], *, block_size: int, seed: int, shard: int,
                     names: Sequence[str] = ()) -> "Schedule":
        """stages: ((start_row, weights over the components), ...). Errors when a positive weight gets 0 rows/block."""
        segments = []
        for start, weights in stages:
            counts = largest_remainder(weights, block_size)
            for i, (w, n) in enumerate(zip(weights, counts)):
                name = names[i] if names else i
                if w > 0 and n == 0:
                    raise ValueError(f"component {name!r} has weight {w:.3g} but gets 0 of the {block_size} rows in "
                                     f"a mixture block; increase MixtureConfig.block_size to >= {int(np.ceil(1 / w))}")
                if w > 0 and abs(n / block_size - w) > 0.01 * w:
                    log.warning("component %r: weight %.4g realizes as %d/%d rows per block = %.4g of the rows; pick "
                                "a block_size that makes weight * block_size a whole number (e.g. 1000 for "
                                "percentages)", name, w, n, block_size, n / block_size)
            segments.append((int(start), tuple(int(n) for n in counts)))
        return cls(tuple(segments), block_size, seed, shard)

    def for_worker(self, worker: int, workers: int, rows_per_step: int) -> "Schedule":
        """The schedule of Grain worker `worker` of `workers`, which builds every `workers`-th batch of the shard
        (global step k * workers + worker is its k-th): a stage starting at global step S starts at the worker's
        first batch at or after S, so stages fire at their step whatever the worker count."""
        segments: dict[int, tuple[int, ...]] = {}
        for start, counts in self.segments:
            step = start // rows_per_step
            segments[max(0, -(-(step - worker) // workers)) * rows_per_step] = counts  # later stage wins a tie
        return dataclasses.replace(self, segments=tuple(sorted(segments.items())))

    def rebased(self, row: int) -> "Schedule":
        """The same weights, with the segment in force at `row` restarting its block grid at `row`."""
        keep = [s for s in self.segments if s[0] > row]
        current = [s for s in self.segments if s[0] <= row][-1]
        return dataclasses.replace(self, segments=((row, current[1]),) + tuple(keep))

    def fingerprint(self) -> str:
        blob = json.dumps([self.segments, self.block_size, self.seed, self.shard])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def block(self, row: int) -> tuple[int, np.ndarray]:
        """(first row of the block holding `row`, component index of every row in that block [block_size])."""
        anchor, counts = [s for s in self.segments if s[0] <= row][-1]
        index = (row - anchor) // self.block_size
        rng = np.random.default_rng([self.seed, self.shard, anchor, index])
        order = rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int32), counts))
        return anchor + index * self.block_size, order


class BlockMixIterDataset(grain.IterDataset):
    """Mixes per-component row streams by a `Schedule`. Elements get `component` (int) added.

    parents: one IterDataset of packed rows per component, in component-index order.
    """

    def __init__(self, parents: Sequence[grain.IterDataset], *, names: Sequence[str], schedule: Schedule,
                 on_exhausted: Sequence[str], max_epochs: Sequence[int | None], rows_per_step: int):
        super().__init__(list(parents))
        self.names = tuple(names)
        self.schedule = schedule
        self.on_exhausted = tuple(on_exhausted)
        self.max_epochs = tuple(max_epochs)
        self.rows_per_step = rows_per_step

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Grain worker `sl.start` of `sl.step` (`mp_prefetch`): its parents read a disjoint slice of the documents
        and its rows are every `sl.step`-th batch, so its stage boundaries move to its own batches."""
        for parent in self._parents:
            parent.set_slice(sl, sequential_slice)
        self.schedule = self.schedule.for_worker(sl.start or 0, sl.step or 1, self.rows_per_step)

    def __iter__(self) -> "_BlockMixIterator":
        return _BlockMixIterator(self, [iter(p) for p in self._parents])

    def __str__(self) -> str:
        return f"BlockMixIterDataset(names={self.names}, block_size={self.schedule.block_size})"


class _BlockMixIterator(grain.DatasetIterator):
    def __init__(self, ds: BlockMixIterDataset, parents: list[grain.DatasetIterator]):
        super().__init__(parents)
        self._ds = ds
        self._schedule = ds.schedule
        self._row = 0
        self._block_start = -1
        self._order = np.zeros(0, np.int32)

    def __next__(self) -> dict[str, Any]:
        sched = self._schedule
        if not (self._block_start <= self._row < self._block_start + sched.block_size) or \
                any(self._block_start < s[0] <= self._row for s in sched.segments):
            self._block_start, self._order = sched.block(self._row)
        c = int(self._order[self._row - self._block_start])
        try:
            element = next(self._parents[c])
        except StopIteration:
            name = self._ds.names[c]
            if self._ds.on_exhausted[c] == "error":
                raise ComponentExhausted(f"component {name!r} ran out of documents after max_epochs="
                                         f"{self._ds.max_epochs[c]} at mixture row {self._row} of shard "
                                         f"{sched.shard}") from None
            log.info("component %r exhausted (max_epochs=%s) at row %d: stopping", name, self._ds.max_epochs[c],
                     self._row)
            raise
        self._row += 1
        element["component"] = c
        return element

    def get_state(self) -> dict[str, Any]:
        return {"row": self._row, "schedule": self._schedule.fingerprint(),
                "segments": [[s, list(c)] for s, c in self._schedule.segments],
                "parents": {n: p.get_state() for n, p in zip(self._ds.names, self._parents)}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._row = int(state["row"])
        self._block_start = -1
        saved = Schedule(tuple((int(s), tuple(c)) for s, c in state["segments"]), self._ds.schedule.block_size,
                         self._ds.schedule.seed, self._ds.schedule.shard)
        if state["schedule"] == self._ds.schedule.fingerprint():
            self._schedule = self._ds.schedule
        elif saved.fingerprint() == state["schedule"] and _same_future(saved, self._ds.schedule, self._row):
            self._schedule = saved  # restored a rebased schedule under the config it was rebased for
        else:
            log.warning("mixture weights differ from the checkpoint's: the new weights apply from row %d on, "
                        "with a new block grid starting there", self._row)
            self._schedule = self._ds.schedule.rebased(self._row)
        for name, parent in zip(self._ds.names, self._parents):
            if name in state["parents"]:
                parent.set_state(state["parents"][name])
            else:
                log.warning("component %r is not in the checkpoint: it starts from its beginning", name)
        dropped = sorted(set(state["parents"]) - set(self._ds.names))
        if dropped:
            log.warning("checkpointed component(s) %s are no longer in the mixture and are ignored", dropped)


def _same_future(saved: Schedule, configured: Schedule, row: int) -> bool:
    """Whether `saved` is `configured` rebased at some row <= `row` (so a second resume keeps the rebased grid)."""
    anchors = [s for s, _ in saved.segments if s <= row]
    return bool(anchors) and configured.rebased(anchors[-1]).segments == saved.segments
