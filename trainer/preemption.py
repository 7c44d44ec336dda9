"""SIGTERM as a request to stop: a process-wide flag that the training loop checks before every step.

train.py installs the handler as its first act, so a SIGTERM at any moment of a run — during start-up (reading data,
compiling), between steps, during the final export — never kills the process: the loop stops before its next step
(the first one, when it came during start-up), saves what it trained and exits 0. Nothing here imports JAX.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

_requested = threading.Event()


def _handle(signum: int, frame: Any) -> None:
    _requested.set()


def install() -> Any:
    """Installs the handler (main thread only), with the flag down; returns the handler it replaced, or None when it
    was installed already (the flag is kept) or this is not the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _handle:
        return None
    _requested.clear()
    return signal.signal(signal.SIGTERM, _handle)


def requested() -> bool:
    """Whether this process received SIGTERM."""
    return _requested.is_set()
