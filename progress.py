"""Progress of long steps: a tqdm bar on stderr when stderr is a terminal, and nothing otherwise (logs, CI, pipes
stay quiet). Any layer may use it, like exit_codes."""
from __future__ import annotations

import sys

from tqdm import tqdm


def on_terminal() -> bool:
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str) -> tqdm:
    """A bar over `total` units (None: a counter), drawn only on a terminal; use it as a context manager."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=not on_terminal())


def note(text: str) -> None:
    """A one-line status on a terminal (what a long step without a count is doing); nothing otherwise."""
    if on_terminal():
        print(text, file=sys.stderr, flush=True)
