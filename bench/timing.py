"""The timing loops of the bench scripts: medians of repeated calls, and of calls alternating between sides."""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np


def median_seconds(fn, *args, repeats: int = 7) -> float:
    """Median wall seconds of `repeats` calls of `fn(*args)`, each waited on (`jax.block_until_ready`), after one
    untimed call (compile, warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def interleaved_medians(sides: dict[str, dict[str, Callable[[], object]]], reps: int,
                        settle: int = 1) -> dict[str, dict[str, float]]:
    """Median seconds of every part of every side, `reps` rounds in which each part runs once per side, alternating;
    each timed call follows `settle` untimed calls of the same part and side. Each call waits for its own result.

    Why alternate: a shared machine's speed drifts over minutes, so timing one side after the other measures the
    drift; alternating puts both sides under the same load. Why settle: the first call after the other side ran is
    not a steady-state call (it re-faults the memory the other side just used and freed)."""
    for fns in sides.values():
        for fn in fns.values():
            fn()  # compile / warm up
    times: dict[str, dict[str, list[float]]] = {side: {part: [] for part in fns} for side, fns in sides.items()}
    parts = list(dict.fromkeys(part for fns in sides.values() for part in fns))
    for _ in range(reps):
        for part in parts:
            for side, fns in sides.items():
                if part in fns:
                    for _ in range(settle):
                        fns[part]()
                    tick = time.perf_counter()
                    fns[part]()
                    times[side][part].append(time.perf_counter() - tick)
    return {side: {part: float(np.median(ts)) for part, ts in by_part.items()} for side, by_part in times.items()}
