"""Where a run's wall time went: MODEL_DIR/goodput.json, summed over every attempt (each relaunch appends one).

The clock charges every second since the process started to exactly one category, the innermost phase open at that
moment (phases nest: a checkpoint save inside the step loop is save time, not step time):

| category | what |
|---|---|
| startup | imports, configuration, the writer lock, opening the data, the initial state from scratch or INIT_FROM |
| restore | reading the checkpoint a resumed run starts from |
| compile | compiling the train step ahead of the loop (the held-out and probe steps compile at their first use, inside evaluation and probes) |
| productive | the step loop, at steps no earlier attempt had reached |
| recomputed | the step loop, at steps an earlier attempt had already logged (from the resumed checkpoint's step up to the furthest step logged: its metrics.jsonl and goodput.json) |
| data_wait | the loop waiting on the data pipeline for its next batch |
| checkpoint_save | saving checkpoints, and waiting for asynchronous saves at the end |
| evaluation | held-out loss (TrainConfig.eval_every) |
| probes | in-loop probes (TrainConfig.probe_sets) |
| export | Hugging Face exports (at the end, and CheckpointConfig.export_every) |
| metrics | writing the last metrics records and closing TensorBoard (and W&B) when the loop ends |
| other | what no phase names: stopping the data pipeline's threads, releasing the writer lock |

Goodput is productive / wall. The loop pays one `perf_counter` per finished step and two per batch taken. An attempt's
record is written at every checkpoint save and at the end (process 0 only), so an attempt killed without warning
keeps its time up to its last save; an attempt stopped because another run took MODEL_DIR writes nothing.

goodput.json: {"attempts": [{"started", "wall_s", "seconds": {category: s}, "steps": {"productive": n,
"recomputed": n}, "first_step", "last_step", "stopped", "devices", "device_kind"}, ...], "total": {"wall_s",
"seconds", "steps", "goodput", "attempts"}}.
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from typing import Any

import storage

log = logging.getLogger(__name__)

FILE = "goodput.json"
CATEGORIES = ("startup", "restore", "compile", "productive", "recomputed", "data_wait", "checkpoint_save",
              "evaluation", "probes", "export", "metrics", "other")


class _Phase:
    """`with clock.phase(name):` — the block's time, less that of phases nested in it, is charged to `name` (which
    may be changed inside the block: it is read when time is charged)."""
    __slots__ = ("clock", "name")

    def __init__(self, clock: "Clock", name: str):
        self.clock, self.name = clock, name

    def __enter__(self) -> "_Phase":
        self.clock._charge()
        self.clock._stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.clock._charge()
        self.clock._stack.pop()


class Clock:
    """One attempt's wall time by category, from `start` (a `time.perf_counter()` reading; default now). Until
    `started()` the time outside phases is start-up, after it "other"."""

    def __init__(self, start: float | None = None):
        self._since = time.perf_counter() if start is None else start
        self._started_at = time.time() - (time.perf_counter() - self._since)
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.steps = {"productive": 0, "recomputed": 0}
        self._stack = [_Phase(self, "startup")]
        self.redo_until = 0      # steps up to this one were logged by an earlier attempt
        self.first_step = self.last_step = 0
        self.previous: list[dict[str, Any]] = []
        self.model_dir: storage.Path | None = None  # set by `open` on the process that writes

    def _charge(self, name: str | None = None) -> None:
        now = time.perf_counter()
        category = name or self._stack[-1].name
        self.seconds[category] = self.seconds.get(category, 0.0) + now - self._since
        self._since = now

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def started(self) -> None:
        """Start-up is over: time outside any phase is "other" from here on."""
        self._charge()
        self._stack[0] = _Phase(self, "other")

    def step_finished(self, step: int) -> None:
        """Charges the loop's time since the last boundary to step `step`: recomputed or productive."""
        redo = step <= self.redo_until
        self._charge("recomputed" if redo else "productive")
        self.steps["recomputed" if redo else "productive"] += 1
        self.last_step = step

    def open(self, model_dir: storage.Path, first_step: int, logged_step: int, writes: bool) -> None:
        """The attempt starts at `first_step`; `logged_step` is the furthest step metrics.jsonl held before this
        attempt. The process that `writes` reads the earlier attempts from MODEL_DIR/goodput.json."""
        self.first_step = self.last_step = first_step
        if writes:
            self.model_dir = storage.Path(model_dir)
            self.previous = read(self.model_dir)
        furthest = max([logged_step, *(a.get("last_step", 0) for a in self.previous)])
        self.redo_until = furthest if furthest > first_step else 0

    def record(self, stopped: str | None = None) -> dict[str, Any]:
        """This attempt so far (charging the open phase up to now)."""
        import jax

        self._charge()
        return {"started": datetime.datetime.fromtimestamp(self._started_at, datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "wall_s": round(sum(self.seconds.values()), 3),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "steps": dict(self.steps),
                "first_step": self.first_step, "last_step": self.last_step, "stopped": stopped,
                "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}

    def write(self, stopped: str | None = None) -> dict[str, Any] | None:
        """Writes goodput.json (the earlier attempts, this one so far, the totals) and returns it; None on a process
        that does not write. A failed write is logged, never the end of the run."""
        if self.model_dir is None:
            return None
        attempts = [*self.previous, self.record(stopped)]
        doc = {"attempts": attempts, "total": totals(attempts)}
        try:
            with storage.atomic_write(self.model_dir / FILE) as f:
                f.write(json.dumps(doc, indent=1) + "\n")
        except OSError as e:
            log.warning("%s: could not write the goodput record (%s: %s)", self.model_dir / FILE, type(e).__name__, e)
        return doc


def read(model_dir: storage.Path | str) -> list[dict[str, Any]]:
    """The attempts recorded in MODEL_DIR/goodput.json ([] without one; an unreadable file is named in a warning and
    its attempts are not counted)."""
    path = storage.Path(model_dir) / FILE
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["attempts"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is not a goodput record (%s); earlier attempts are not counted", path, e)
        return []


def totals(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = {k: round(sum(a["seconds"].get(k, 0.0) for a in attempts), 3) for k in CATEGORIES}
    wall = round(sum(a["wall_s"] for a in attempts), 3)
    steps = {k: sum(a["steps"][k] for a in attempts) for k in ("productive", "recomputed")}
    return {"wall_s": wall, "seconds": seconds, "steps": steps,
            "goodput": round(seconds["productive"] / wall, 4) if wall else 0.0, "attempts": len(attempts)}


def summary_line(doc: dict[str, Any]) -> str:
    """`goodput 72.0% of 1.2min over 2 attempts: productive 52s, compile 9s, ...` (categories over 0.5% of wall)."""
    t = doc["total"]
    parts = [f"{k} {_duration(v)}" for k, v in sorted(t["seconds"].items(), key=lambda kv: -kv[1])
             if v > 0.005 * t["wall_s"]]
    redo = f" ({t['steps']['recomputed']} steps computed twice)" if t["steps"]["recomputed"] else ""
    return (f"goodput {t['goodput']:.1%} of {_duration(t['wall_s'])} over {t['attempts']} attempt(s)"
            f"{redo}: {', '.join(parts)}")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 90 else (f"{seconds / 60:.1f}min" if seconds < 5400
                                                   else f"{seconds / 3600:.1f}h")
