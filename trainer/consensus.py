"""Decisions every JAX process takes together, at the same step.

A multi-host run is one SPMD program: if one process leaves the training loop (SIGTERM, its data shard ran out) while
the others enter the next train step or a checkpoint save, every process hangs in a collective. So before each step
every process publishes its local reasons to stop and all of them act on the union.

The vote goes through the JAX coordination service (the key-value store and barrier behind `jax.distributed`), not
through the devices: it never waits for the step the devices are still running, so it costs the loop one round trip
to process 0's coordinator (about 1.5 ms per step measured with 2 processes on a loaded 2-core machine) and no device
time. A non-finite loss needs no vote: the loss is a replicated output of the step, the same value on every process.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import jax

# The barrier waits for the slowest process to reach the same step; a dead process is reported by the coordination
# service's heartbeats long before this.
TIMEOUT_MS = 30 * 60 * 1000
_rounds = itertools.count()  # every process votes the same number of times, so round numbers match across processes


class OtherProcessFailed(RuntimeError):
    """Another process raised inside a `together` block; its own log has the error."""


def agree(local: set[str] | frozenset[str]) -> frozenset[str]:
    """The union of every process's `local` reasons (short names without commas, e.g. "preempted").

    Every process must call this the same number of times, in the same order; with one process it returns `local`.
    """
    if jax.process_count() == 1:
        return frozenset(local)
    from jax._src import distributed  # the coordination service client; Orbax's multihost utilities use it too

    client = distributed.global_state.client
    me, n = jax.process_index(), next(_rounds)
    client.key_value_set(f"docmix/vote/{n}/{me}", ",".join(sorted(local)))
    client.wait_at_barrier(f"docmix/vote/{n}", TIMEOUT_MS)
    votes = client.key_value_dir_get(f"docmix/vote/{n}/")
    if n:  # every process has read round n - 1 before it reached this barrier
        client.key_value_delete(f"docmix/vote/{n - 1}/{me}")
    return frozenset(reason for _, value in votes for reason in value.split(",") if reason)


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Runs the block on every process and agrees on its outcome: when it raises on one process, that process
    re-raises its error and every other process raises OtherProcessFailed, instead of walking on into a collective
    the failed process never reaches (which would end only when the coordination service's heartbeat timeout killed
    it). For work that can fail on one process alone: reading its own data shards, writing files as process 0.
    Every process must enter the same `together` blocks in the same order (each is one vote)."""
    try:
        yield
    except Exception:
        agree({"failed"})
        raise
    if agree(frozenset()):
        raise OtherProcessFailed(f"another process failed while {what} (its log has the error); this one stops too")
