"""The JAX coordination service behind `jax.distributed`: joining it with docmix's timeouts, and its key-value store.

Every multi-process decision (trainer.consensus) and the liveness watch (trainer.pod) go through the coordination
service's key-value store and barriers, which never wait for the devices. JAX has no public API for that store, so
`client()` takes it from `shims.jax_coordination_client` (tests/test_shims.py and tests/test_coordination.py fail
loudly when a JAX upgrade changes it).
"""
from __future__ import annotations

from typing import Any

import jax

import shims
from trainer import preemption

# JAX ends every process with an abort (exit 134, a C++ stack) when a process has been silent, or has not joined,
# this long past docmix's bound: trainer.pod must always act first.
HEARTBEAT_MARGIN_S = 60


def initialize(timeout_s: float, **cluster: Any) -> None:
    """`jax.distributed.initialize(**cluster)` (coordinator_address, num_processes, process_id; each detected on Cloud
    TPU and other clusters when left out) with docmix's bound `timeout_s`: JAX's own time limits for joining and for
    a silent process (both end in an abort) lie HEARTBEAT_MARGIN_S past it, and leaving waits at most `timeout_s`
    for the others."""
    seconds = max(1, round(timeout_s))
    jax.distributed.initialize(**cluster, initialization_timeout=seconds + HEARTBEAT_MARGIN_S,
                               heartbeat_timeout_seconds=seconds + HEARTBEAT_MARGIN_S,
                               shutdown_timeout_seconds=seconds)
    preemption.install()  # JAX's distributed runtime took SIGTERM for its preemption notifier: ours again


def client() -> Any:
    """This process's coordination service client (after `initialize`): `key_value_set(key, value,
    allow_overwrite=False)`, `key_value_dir_get(prefix) -> [(key, value)]`, `key_value_delete(key)`,
    `wait_at_barrier(name, timeout_ms)`."""
    found = shims.jax_coordination_client()
    if found is None:
        raise RuntimeError("the JAX coordination service is not initialized (train.py --distributed)")
    return found
