"""Which checkpoints are good: loss-check records, the newest good step kept by retention, and setting aside.

The checkpoint of step k holds the parameters after step k's update; no loss has been computed from them when it is
written. It counts as good once step k+1's loss (computed from exactly those parameters) is finite. The training loop
reports that with `Checkpointer.mark_good(k)`, and a non-finite loss with `mark_nonfinite(k)`. The verdict is stored
as RECORD, a small JSON file inside the committed step directory (Orbax reads only its item folders, and a record
travels with its checkpoint when that is moved). Saves are asynchronous, so a verdict about a step still being
written is kept in memory and written once the save has committed.

A checkpoint that must not be resumed (non-finite loss, or damaged: it cannot be read) is never deleted
automatically: it is moved to MODEL_DIR/SET_ASIDE/<step> with a `reason.txt`, which frees its step number for the
resumed run's own saves.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Callable, Sequence

import storage

log = logging.getLogger(__name__)
RECORD = "loss_check.json"
SET_ASIDE = "checkpoints_set_aside"
GOOD, NONFINITE = "good", "nonfinite"


def read_verdicts(ckpt_dir: pathlib.Path) -> dict[int, str]:
    """{step: GOOD | NONFINITE} of the committed steps in `ckpt_dir` that carry a record."""
    out = {}
    if not ckpt_dir.is_dir():
        return out
    for step_dir in ckpt_dir.iterdir():
        record = step_dir / RECORD
        if step_dir.name.isdigit() and record.is_file():
            try:
                out[int(step_dir.name)] = json.loads(record.read_text())["verdict"]
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable (%s); step %s counts as not verified", record, e, step_dir.name)
    return out


def write_verdict(ckpt_dir: pathlib.Path, step: int, verdict: str, detail: str) -> None:
    """Writes RECORD into the committed step directory (never seen half written: storage.atomic_write)."""
    step_dir = ckpt_dir / str(step)
    if not step_dir.is_dir():
        log.warning("%s: not committed; its verdict (%s) is not recorded", step_dir, verdict)
        return
    with storage.atomic_write(step_dir / RECORD) as f:
        f.write(json.dumps({"verdict": verdict, "detail": detail, "time": time.time()}) + "\n")


def newest(verdicts: dict[int, str], verdict: str) -> int | None:
    return max((s for s, v in verdicts.items() if v == verdict), default=None)


def set_aside(ckpt_dir: pathlib.Path, step: int, reason: str) -> pathlib.Path:
    """Moves checkpoints/<step> to MODEL_DIR/SET_ASIDE/<step>[.n] with `reason.txt`; returns the new path."""
    target_root = ckpt_dir.parent / SET_ASIDE
    target_root.mkdir(exist_ok=True)
    target, n = target_root / str(step), 1
    while target.exists():
        target, n = target_root / f"{step}.{n}", n + 1
    storage.move_tree(ckpt_dir / str(step), target)
    (target / "reason.txt").write_text(reason + "\n")
    return target


def short_error(e: BaseException) -> str:
    """The first line of an exception (Orbax/TensorStore messages run to dozens of lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


class PreserveStep:
    """Orbax preservation policy keeping the step `current()` returns (the newest good one), whatever LatestN says."""

    def __init__(self, current: Callable[[], int | None]):
        self.current = current

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        keep = self.current()
        return [c.step == keep for c in checkpoints]
