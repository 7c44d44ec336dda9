"""SIGTERM as a request to stop: a process-wide flag that the training loop checks before every step.

train.py installs the handler as its first act (trainer.coordination again once JAX's distributed runtime is up), so
a SIGTERM at any moment of a run — during start-up (reading data, compiling), between steps, during the final export
— never kills the process: the loop stops before its next step (the first one, when it came during start-up), saves
what it trained and exits 0. Nothing here imports JAX.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

_requested = threading.Event()


def _handle(signum: int, frame: Any) -> None:
    _requested.set()


def install() -> Any:
    """Installs the handler (main thread only); returns the handler it replaced, or None off the main thread. The
    flag is lowered unless the handler was installed already. The handler is set again even when Python's record
    says it is in place: jax.distributed.initialize installs JAX's own SIGTERM handler (a preemption notifier) below
    Python, which Python's record does not show, so trainer.coordination calls this again after it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, _handle)
    if previous is not _handle:
        _requested.clear()
    return previous


def requested() -> bool:
    """Whether this process received SIGTERM."""
    return _requested.is_set()
