"""Decisions every JAX process takes together, at the same step.

A multi-host run is one SPMD program: if one process leaves the training loop (SIGTERM, its data shard ran out) while
the others enter the next train step or a checkpoint save, every process hangs in a collective. So before each step
every process publishes its local reasons to stop and all of them act on the union; work that can fail on one
process alone ends in a vote on its outcome (`together`); and what may come out differently on different processes
(which checkpoints exist and which to resume) is decided by process 0 and handed to all (`from_process_0`).

The votes go through the JAX coordination service (trainer.coordination: its key-value store and barriers), not
through the devices: a vote never waits for the step the devices are still running, so it costs the loop one round
trip to process 0's coordinator per step and no device time. A non-finite loss needs no vote: the loss is a replicated
output of the step, the same value on every process. A process that fails or is lost where no vote waits for it
(inside a collective) is trainer.pod's to end.
"""
from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax

from trainer import coordination, pod
from trainer.pod import OtherProcessFailed

# The barrier waits for the slowest process to reach the same vote; a failed or lost process is ended by
# trainer.pod's watch within its bound, long before this.
TIMEOUT_MS = 30 * 60 * 1000
_rounds = itertools.count()  # every process votes the same number of times, so round numbers match across processes
T = TypeVar("T")


def gather(value: str) -> list[str]:
    """Every process's `value`, in process order. Every process must call this (and `agree`) the same number of times,
    in the same order; with one process it returns [value]."""
    if jax.process_count() == 1:
        return [value]
    client = coordination.client()
    me, n = jax.process_index(), next(_rounds)
    client.key_value_set(f"docmix/vote/{n}/{me}", value)
    client.wait_at_barrier(f"docmix/vote/{n}", TIMEOUT_MS)
    values = dict(client.key_value_dir_get(f"docmix/vote/{n}/"))
    if n:  # every process has read round n - 1 before it reached this barrier
        client.key_value_delete(f"docmix/vote/{n - 1}/{me}")
    return [values[f"docmix/vote/{n}/{i}"] for i in range(jax.process_count())]


def agree(local: set[str] | frozenset[str]) -> frozenset[str]:
    """The union of every process's `local` reasons (short names without commas, e.g. "preempted")."""
    return frozenset(reason for value in gather(",".join(sorted(local))) for reason in value.split(",") if reason)


def other_failed(what: str) -> OtherProcessFailed:
    """The error this process raises when a vote says that another process failed while `what`: it names the first
    failed process and its error, with that process's exit code."""
    failed = pod.failures()
    if not failed:
        return OtherProcessFailed(f"another process failed while {what} (its log has the error); this one stops too")
    index, record = min(failed.items(), key=lambda item: (not item[1]["cause"], item[0]))  # a first failure first
    return OtherProcessFailed(pod.describe(index, jax.process_count(), record), record["code"])


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Runs the block on every process and agrees on its outcome: when it raises on one process, that process
    publishes its error (trainer.pod.report_failure) and re-raises it, and every other process raises
    OtherProcessFailed naming it, instead of walking on into a collective the failed process never reaches. For work
    that can fail on one process alone: reading its own data shards, writing files as process 0. Every process must
    enter the same `together` blocks in the same order (each is one vote)."""
    try:
        yield
    except Exception as e:
        pod.settle(e)  # a collective in the block failed because another process is gone: the watch names that one
        pod.report_failure(e, what)
        agree({"failed"})
        raise
    if agree(frozenset()):
        raise other_failed(what)


def from_process_0(what: str, fn: Callable[[], T]) -> T:
    """`fn()` computed by process 0 alone and handed to every process (its value must survive a JSON round trip), so
    a decision that could come out differently on each process (a listing of remote storage, a file one process
    cannot read) is taken once. An error in `fn` stops every process as in `together`."""
    if jax.process_count() == 1:
        return fn()
    value: Any = None
    with together(what):
        if jax.process_index() == 0:
            value = fn()
    return json.loads(gather(json.dumps(value))[0])


def outcome(fn: Callable[[], T], describe: Callable[[BaseException], str],
            reraise: tuple[type[BaseException], ...] = ()) -> tuple[T | None, str | None]:
    """(fn(), None) when `fn` returned on every process, else (None, `describe` of the first failed process's error);
    exceptions of the `reraise` types are raised at once (they are the same on every process). For attempts whose
    failure every process must act on alike (a checkpoint that cannot be read on one host is skipped by all)."""
    try:
        value, error = fn(), ""
    except reraise:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is an outcome to agree on
        value, error = None, describe(e)
    errors = gather(error)
    failed = [(i, text) for i, text in enumerate(errors) if text]
    if not failed:
        return value, None
    index, text = failed[0]
    return None, text if jax.process_count() == 1 else f"process {index} of {len(errors)}: {text}"
