"""Block-deterministic token-share mixture of packed rows (Levanter-style), as a checkpointable Grain IterDataset.

Every row holds one component's tokens. Rows are grouped in blocks (data.blocks): a block of n rows gives each
component exactly `largest_remainder(shares, n)` rows, in an order permuted with a seed derived from (seed, shard,
stretch start, block index). A component's rows are consumed in its own order, so the schedule (which component fills
row r) is a pure function of the shares and r: it needs no data and never drifts.

Stages, run end and resume: a schedule is a list of segments `(start_row, block, shares)`, each running to the next
segment's start; blocks are laid out from the start of each segment, and the last block of a segment is cut short by
the next one. Stages start segments, and so does the run's end (`end`), so the rows of every stage of the run, and of
a run shorter than one block, hold their shares whole. When a checkpoint made under another layout (other weights,
stages, block size or run length) is restored, the new layout takes effect at the restored row as a fresh segment (a
new block grid anchored there); every component continues from its own saved position and components new to the
mixture start from their beginning.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

import exit_codes
from data.blocks import block_rows, largest_remainder, stretch_rows

log = logging.getLogger(__name__)

Segment = tuple[int, int, tuple[float, ...]]  # (start row, rows per full block, row share of each component)


class ComponentExhausted(RuntimeError):
    """A component with `on_exhausted="error"` ran past its `max_epochs`."""
    exit_code = exit_codes.STOPPED


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which component fills each row of one data shard.

    segments: ((start_row, block, shares [C]), ...) with increasing start rows, the first at 0; segment i covers
      rows [start_i, start_{i+1}) (the last: every row after its start).
    """

    segments: tuple[Segment, ...]
    seed: int
    shard: int

    @classmethod
    def from_weights(cls, stages: Sequence[tuple[int, Sequence[float]]], *, block_size: int, seed: int, shard: int,
                     end: int | None = None, names: Sequence[str] = (), allow_empty: bool = False) -> "Schedule":
        """stages: ((start_row, row shares over the components), ...), the first at row 0. end: the row the run ends
        at (None: open-ended); it starts a segment of its own, so the run's last stretch holds its shares (rows read
        past it go on under the same shares, in a new grid). Each segment's block is `block_rows(shares,
        block_size)`. Errors when a positive share gets 0 rows of a full block, or (unless `allow_empty`) of a
        stretch of the run."""
        starts = [int(start) for start, _ in stages]
        bounds = sorted(set(starts) | ({int(end)} if end is not None else set()))
        segments = []
        for i, start in enumerate(bounds):
            shares = tuple(float(s) for s in stages[max(j for j, s in enumerate(starts) if s <= start)][1])
            block = block_rows(shares, block_size)
            _check_block(shares, block, names)
            stop = bounds[i + 1] if i + 1 < len(bounds) else None
            if end is not None and stop is not None and stop <= end and not allow_empty:
                rows = stretch_rows(shares, stop - start, block)
                empty = [_name(names, c) for c, (w, n) in enumerate(zip(shares, rows)) if w > 0 and n == 0]
                if empty:
                    raise ValueError(f"component(s) {empty} have a positive share but get none of the {stop - start} "
                                     f"rows of data shard {shard} from row {start} to row {stop}; raise TRAIN_STEPS "
                                     "or BATCH_SIZE, or bind MixtureConfig.allow_unrealized_shares = True to train "
                                     "without them")
            segments.append((start, block, shares))
        return cls(tuple(segments), seed, shard)

    def for_worker(self, worker: int, workers: int, rows_per_step: int) -> "Schedule":
        """The schedule of Grain worker `worker` of `workers`, which builds every `workers`-th batch of the shard
        (global step k * workers + worker is its k-th): a segment starting at global step S starts at the worker's
        first batch at or after S, so stages fire at their step whatever the worker count."""
        segments: dict[int, Segment] = {}
        for start, block, shares in self.segments:
            step = start // rows_per_step
            row = max(0, -(-(step - worker) // workers)) * rows_per_step
            segments[row] = (row, block, shares)  # a later segment wins a tie
        return dataclasses.replace(self, segments=tuple(sorted(segments.values())))

    def rebased(self, row: int) -> "Schedule":
        """The same layout, with the segment in force at `row` restarting its block grid at `row`."""
        keep = [s for s in self.segments if s[0] > row]
        _, block, shares = [s for s in self.segments if s[0] <= row][-1]
        return dataclasses.replace(self, segments=((row, block, shares),) + tuple(keep))

    def fingerprint(self) -> str:
        blob = json.dumps([self.segments, self.seed, self.shard])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def block(self, row: int) -> tuple[int, np.ndarray]:
        """(first row of the block holding `row`, component index of every row in that block [its rows])."""
        i = max(i for i, s in enumerate(self.segments) if s[0] <= row)
        start, block, shares = self.segments[i]
        index = (row - start) // block
        first = start + index * block
        stop = first + block if i + 1 == len(self.segments) else min(first + block, self.segments[i + 1][0])
        rng = np.random.default_rng([self.seed, self.shard, start, index])
        counts = largest_remainder(shares, stop - first)
        return first, rng.permutation(np.repeat(np.arange(len(shares), dtype=np.int32), counts))


def _name(names: Sequence[str], c: int) -> str | int:
    return names[c] if names else c


def _check_block(shares: Sequence[float], block: int, names: Sequence[str]) -> None:
    """A positive share must get a row in every full block; a share that rounds far off is logged."""
    counts = largest_remainder(shares, block)
    for c, (w, n) in enumerate(zip(shares, counts)):
        if w > 0 and n == 0:
            raise ValueError(f"component {_name(names, c)!r} has weight {w:.3g} but gets 0 of the {block} rows in a "
                             f"mixture block; increase MixtureConfig.block_size to >= {int(np.ceil(1 / w))}")
        if w > 0 and abs(n / block - w) > 0.01 * w:
            _warn_once(f"component {_name(names, c)!r}: weight {w:.4g} realizes as {n}/{block} rows per block = "
                       f"{n / block:.4g} of the rows; pick a block_size that makes weight * block_size a whole number "
                       "(e.g. 1000 for percentages)")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """Logs `message` once per process: every data shard and every segment of a schedule checks its blocks."""
    log.warning("%s", message)


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
        return f"BlockMixIterDataset(names={self.names}, segments={len(self.schedule.segments)})"


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
        if not self._block_start <= self._row < self._block_start + len(self._order):  # blocks end at segments
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
            if len(self._ds.names) > 1:  # one component's end stops the others; a lone stream simply ends
                log.info("component %r exhausted (max_epochs=%s) at row %d: stopping", name, self._ds.max_epochs[c],
                         self._row)
            raise
        self._row += 1
        element["component"] = c
        return element

    def get_state(self) -> dict[str, Any]:
        return {"row": self._row, "schedule": self._schedule.fingerprint(),
                "segments": [[s, b, list(w)] for s, b, w in self._schedule.segments],
                "parents": {n: p.get_state() for n, p in zip(self._ds.names, self._parents)}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._row = int(state["row"])
        self._block_start, self._order = -1, np.zeros(0, np.int32)
        configured = self._ds.schedule
        saved = _saved_schedule(state["segments"], configured)
        if state["schedule"] == configured.fingerprint():
            self._schedule = configured
        elif saved and saved.fingerprint() == state["schedule"] and _same_future(saved, configured, self._row):
            self._schedule = saved  # restored a rebased schedule under the config it was rebased for
        else:
            log.warning("the mixture's layout (weights, stages, block size or run length) differs from the "
                        "checkpoint's: it applies from row %d on, with a new block grid starting there", self._row)
            self._schedule = configured.rebased(self._row)
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
    anchors = [s[0] for s in saved.segments if s[0] <= row]
    return bool(anchors) and configured.rebased(anchors[-1]).segments == saved.segments


def _saved_schedule(segments: list, configured: Schedule) -> Schedule | None:
    """The schedule a checkpoint's state was saved under (None: a state of another layout format)."""
    if not all(len(s) == 3 for s in segments):
        return None
    return dataclasses.replace(configured, segments=tuple((int(s), int(b), tuple(float(x) for x in w))
                                                          for s, b, w in segments))
