"""A multi-process run's liveness: no process waits for one that failed or is gone longer than a stated bound.

A collective waits forever for a process that raised or died, and JAX's coordination service notices a dead process
only after its heartbeat timeout, then aborts every other process (exit 134, a C++ stack). So every process of a
`train.py --distributed` run `join`s a watch: a thread that every `interval` writes this process's pulse (a counter
and its step) to the coordination service's key-value store, reads the others' pulses and failures, and ends this
process when
- another process reported an error (`report_failure`, published as soon as it is raised) and this one has not
  stopped by itself within GRACE_BEATS beats (it is not in a vote that would stop it, but inside a collective): with
  that process's exit code and "process 1 of 2 failed at step 5: <its error>";
- another process left with an error (`leave`): at once, the same;
- another process's pulse has not moved for `timeout`/2 while this watch beat at least 3 times (so a stalled watcher
  does not blame the others): exit 3, "process 1 of 2 stopped answering (lost) at step 5";
- the coordination service has not answered for `timeout`/2: exit 3.
So a failure in any process ends every process within `timeout` (train.py --failure_timeout), and JAX's own
heartbeat is set past it (trainer.coordination). The end is one line on stderr, the `on_abort` cleanups (releasing
the writer lock; at most CLEANUP_S) and `os._exit`: a thread blocked in a collective cannot be interrupted, and JAX's
exit handler would wait for the others. Process 0 hosts the coordination service, so before it leaves with an error
it waits (at most `timeout`/4) for the others to leave first, which lets them read its error. If process 0 is killed
outright (SIGKILL, a lost VM), the service goes with it and JAX aborts the other processes at once.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import jax

import exit_codes
from trainer import coordination

log = logging.getLogger(__name__)
PULSE, FAILED, ENDED = "docmix/pulse/", "docmix/failed/", "docmix/ended/"
GRACE_BEATS = 3
CLEANUP_S = 5.0


class OtherProcessFailed(RuntimeError):
    """Another process failed; the message names it and its error, and the exit code is that process's (1 when it
    is not known)."""

    def __init__(self, message: str, exit_code: int = exit_codes.STOPPED):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: str, limit: int = 1000) -> str:
    """The first line of an error message, shortened to `limit` characters (what is published to the others)."""
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[:limit - 3] + "..."


class _Watch:
    def __init__(self, prog: str, timeout_s: float):
        self.prog, self.timeout = prog, float(timeout_s)
        self.me, self.n = jax.process_index(), jax.process_count()
        self.interval = min(5.0, self.timeout / 24)
        self.lost_after = self.timeout / 2
        self.step = 0
        self.failure: dict[str, Any] | None = None   # this process's reported error
        self.leaving = False
        self.others_failed = False   # another process reported an error or left with one (as last read)
        self.cleanups: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="docmix-pod-watch", daemon=True)
        self._seen: dict[int, tuple[str | None, float, int]] = {}   # peer -> (pulse, when it last moved, our beat)
        self._failed_since: dict[int, int] = {}                      # peer -> our beat when its failure was read
        self._lost: set[int] = set()

    # --- the watch thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        client = coordination.client()
        beats, answered = 0, time.monotonic()
        now = answered
        self._seen = {j: (None, now, 0) for j in range(self.n) if j != self.me}
        while not self._stop.wait(self.interval):
            beats += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"{PULSE}{self.me}", f"{beats} {self.step}", allow_overwrite=True)
                pulses = dict(client.key_value_dir_get(PULSE))
                failed, ended = _records(client, FAILED), _records(client, ENDED)
            except Exception as e:  # noqa: BLE001 - the service is unreachable: judged below, never raised
                if not self.leaving and now - answered > self.lost_after:
                    self.end(exit_codes.UNAVAILABLE, f"the coordination service (process 0 of {self.n}) stopped "
                                                     f"answering at step {self.step}: {one_line(str(e))}")
                continue
            answered = now
            self.others_failed = any(j != self.me for j in failed) or any(
                j != self.me and r["code"] != exit_codes.OK for j, r in ended.items())
            verdict = None if self.leaving else self._judge(beats, now, pulses, failed, ended)
            if verdict is not None:
                self.end(*verdict)

    def _judge(self, beats: int, now: float, pulses: dict[str, str], failed: dict[int, dict],
               ended: dict[int, dict]) -> tuple[int, str] | None:
        """(exit code, message) when this process must end, else None."""
        for j, record in sorted(ended.items()):
            if j != self.me and record["code"] != exit_codes.OK:
                return record["code"], describe(j, self.n, failed.get(j, record))
        for j, record in sorted(failed.items()):
            if j != self.me and beats - self._failed_since.setdefault(j, beats) >= GRACE_BEATS:
                return record["code"], describe(j, self.n, record)
        for j, (last, moved, at_beat) in self._seen.items():
            pulse = pulses.get(f"{PULSE}{j}")
            if pulse != last:
                self._seen[j] = (pulse, now, beats)
            elif now - moved > self.lost_after and beats - at_beat >= 3:
                self._lost.add(j)
                # Processes step together; a pulse is up to one interval old, so the later of the two steps is nearer.
                step = max(int(pulse.split()[1]), self.step) if pulse else "start-up"
                if j in ended:
                    return exit_codes.UNAVAILABLE, (f"process {j} of {self.n} left (exit 0) at step {step} while this "
                                                    "process was still running")
                return exit_codes.UNAVAILABLE, f"process {j} of {self.n} stopped answering (lost) at step {step}"
        return None

    # --- ending ---------------------------------------------------------------------------------------------------

    def end(self, code: int, message: str) -> NoReturn:
        """Ends this process from the watch: one line, cleanups, then os._exit (see the module docstring)."""
        own = self.failure is not None  # this process failed first and could not stop by itself: its error counts
        if own:
            code, message = self.failure["code"], self.failure["message"]
        print(f"{self.prog}: error: {message}{'' if own else '; this process stops too'}", file=sys.stderr, flush=True)
        self._publish(ENDED, code, message, cause=own and self.failure["cause"])
        done = threading.Thread(target=self._clean_up, daemon=True)
        done.start()
        done.join(CLEANUP_S)
        self._exit(code)

    def leave(self, code: int) -> NoReturn:
        """Ends this process after main() returned `code`: published for the others; with an error, process 0 first
        waits for the others to leave; then os._exit (an exit with 0 goes through JAX's own orderly shutdown)."""
        self.leaving = True
        message = self.failure["message"] if self.failure else f"it exited with code {code}"
        self._publish(ENDED, code, message, cause=self.failure["cause"] if self.failure else True)
        if code == exit_codes.OK:
            self._stop.set()
            self._thread.join(timeout=self.interval + 5)
            sys.exit(code)
        self._exit(code)

    def _exit(self, code: int) -> NoReturn:
        if self.me == 0:
            self._wait_for_others()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _wait_for_others(self) -> None:
        deadline = time.monotonic() + self.timeout / 4
        while time.monotonic() < deadline:
            try:
                ended = _records(coordination.client(), ENDED)
            except Exception:  # noqa: BLE001
                return
            if all(j in ended or j in self._lost for j in range(1, self.n)):
                return
            time.sleep(min(0.2, self.interval))

    def _clean_up(self) -> None:
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.warning("cleanup on exit failed: %s", e)

    def _publish(self, prefix: str, code: int, message: str, *, cause: bool, what: str = "") -> None:
        record = {"code": code, "message": message, "step": self.step, "what": what, "cause": cause}
        try:
            coordination.client().key_value_set(f"{prefix}{self.me}", json.dumps(record), allow_overwrite=True)
        except Exception as e:  # noqa: BLE001 - the others then find this process lost instead
            log.warning("could not publish this process's %s record: %s", prefix.split("/")[1], e)

    def report(self, error: BaseException, what: str) -> None:
        """Keeps this process's first error (or the first one that is not a consequence of another process's) and
        publishes it; the same error reported again (re-raised further up) changes nothing."""
        cause = not isinstance(error, OtherProcessFailed)
        if self.failure is not None and (self.failure["error"] is error or self.failure["cause"] or not cause):
            return
        code, message = exit_codes.code_for(error), one_line(exit_codes.message(error))
        self.failure = {"code": code, "message": message, "cause": cause, "error": error}
        if cause:
            self._publish(FAILED, code, message, cause=True, what=what)


def _records(client: Any, prefix: str) -> dict[int, dict]:
    return {int(key[len(prefix):]): json.loads(value) for key, value in client.key_value_dir_get(prefix)}


def describe(index: int, count: int, record: dict) -> str:
    """How another process's failure record reads here: the process that failed first names itself; a process that
    stopped because of another repeats that one's message."""
    if not record.get("cause", True):
        return record["message"]
    where = (f"while {record['what']}" if record.get("what") else
             f"at step {record['step']}" if record.get("step") else "at start-up")
    return f"process {index} of {count} failed {where}: {record['message']}"


_watch: _Watch | None = None


def join(prog: str, timeout_s: float, cluster: dict[str, Any]) -> None:
    """Joins the run's processes (trainer.coordination.initialize with `cluster`: coordinator_address,
    num_processes, process_id, each detected on Cloud TPU when left out) and starts this process's watch. A process
    that has not been joined by all the others within `timeout_s` ends with exit 3 (JAX itself would abort later)."""
    global _watch
    joined = threading.Event()

    def give_up() -> None:
        if not joined.wait(timeout_s):
            where = cluster or "the cluster JAX detected"
            print(f"{prog}: error: not every process of the run joined within {timeout_s:g} s ({where}); start every "
                  "process, with the same coordinator and process count", file=sys.stderr, flush=True)
            os._exit(exit_codes.UNAVAILABLE)

    threading.Thread(target=give_up, name="docmix-pod-join", daemon=True).start()
    try:
        coordination.initialize(timeout_s, **cluster)
    finally:  # joined, or initialize raised (a bad layout): either way nothing is left to give up on
        joined.set()
    if jax.process_count() > 1:
        _watch = _Watch(prog, timeout_s)
        _watch._thread.start()


def progress(step: int) -> None:
    """The step this process is at, published with its pulse (named when it is lost or fails)."""
    if _watch is not None:
        _watch.step = step


def report_failure(error: BaseException, what: str = "") -> None:
    """Publishes `error` (its exit code and first line) for the other processes as soon as it is raised: the vote
    that follows, or the others' watches, name it. An OtherProcessFailed (a consequence of another failure) is kept
    as this process's outcome but not published."""
    if _watch is not None:
        _watch.report(error, what)


def settle(error: BaseException) -> None:
    """Before `error` counts as this process's own, wait for proof that the others live: a collective raises when
    another process is gone (on CPU, gloo's "Connection reset by peer" as a JaxRuntimeError, or wrapped in another
    error by the library that ran it, such as a checkpoint save; on TPU it would hang). The proof is two beats of
    every other process written to the coordination service after this error (one may have been on its way from a
    process that died since). Without it, the watch ends this process naming the one lost or failed
    (`timeout`/2 and 3 beats after it last saw it beat). It waits at most `timeout`, then the error is this
    process's."""
    if _watch is None or isinstance(error, OtherProcessFailed):
        return
    client = coordination.client()

    def beats() -> dict[str, int] | None:
        try:
            return {key: int(value.split()[0]) for key, value in client.key_value_dir_get(PULSE)}
        except Exception:  # noqa: BLE001 - the service is unreachable: the watch judges that
            return None

    others = [f"{PULSE}{j}" for j in range(_watch.n) if j != _watch.me]
    first, deadline = beats(), time.monotonic() + _watch.timeout
    while time.monotonic() < deadline:
        time.sleep(_watch.interval / 2)
        now = beats()
        if first is None:
            first = now
        elif now is not None and not _watch.others_failed and all(
                now.get(key, -1) >= first.get(key, 0) + 2 for key in others):
            return


def failures() -> dict[int, dict]:
    """{process: its failure record} of the processes that reported an error or left with one."""
    if _watch is None:
        return {}
    client = coordination.client()
    ended = {j: r for j, r in _records(client, ENDED).items() if r["code"] != exit_codes.OK}
    return {**ended, **_records(client, FAILED)}  # a failure as reported names what the process was doing


def on_abort(fn: Callable[[], None]) -> Callable[[], None]:
    """Registers `fn` to run (best effort, at most CLEANUP_S for all) when the watch ends this process; returns a
    function that unregisters it."""
    if _watch is None:
        return lambda: None
    _watch.cleanups.append(fn)
    return lambda: _watch.cleanups.remove(fn) if fn in _watch.cleanups else None


def leave(code: int) -> NoReturn:
    """Exits with `code`; in a run of several processes through `_Watch.leave` (the others are told first)."""
    if _watch is None:
        sys.exit(code)
    _watch.leave(code)
