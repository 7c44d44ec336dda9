"""trainer.pod's verdicts, beat by beat, without processes: when another process's failure, exit or silence ends
this one, with which exit code and message (tests/test_pod_failures.py runs the real thing)."""
import pytest

from trainer import pod

INTERVAL = 1.0


@pytest.fixture
def watch():
    w = pod._Watch("train.py", timeout_s=24 * INTERVAL)  # interval 1 s, lost after 12 s of silence
    w.me, w.n = 0, 3
    w._seen = {j: (None, 0.0, 0) for j in (1, 2)}
    return w


def beat(w, k, pulses=None, failed=None, ended=None):
    """Beat k at time k * INTERVAL; by default processes 1 and 2 moved their pulse on this beat."""
    pulses = {f"{pod.PULSE}{j}": f"{k} {k}" for j in (1, 2)} if pulses is None else pulses
    return w._judge(k, k * INTERVAL, pulses, failed or {}, ended or {})


def record(code, message, step=5, what="", cause=True):
    return {"code": code, "message": message, "step": step, "what": what, "cause": cause}


def test_a_reported_failure_ends_this_process_after_the_grace_beats(watch):
    failed = {2: record(2, "component 'x': 101 bad records", what="opening its data shards")}
    for k in range(1, 1 + pod.GRACE_BEATS):
        assert beat(watch, k, failed=failed) is None  # a vote may still stop this process cleanly
    assert beat(watch, 1 + pod.GRACE_BEATS, failed=failed) == (
        2, "process 2 of 3 failed while opening its data shards: component 'x': 101 bad records")


def test_an_exit_with_an_error_ends_this_process_at_once_and_an_echo_keeps_the_first_name(watch):
    ended = {1: record(4, "process 2 of 3 failed at step 5: boom", cause=False)}
    assert beat(watch, 1, ended=ended) == (4, "process 2 of 3 failed at step 5: boom")
    assert beat(watch, 2, ended={1: record(0, "")}) is None  # a clean exit alone is no reason


def test_a_silent_process_is_lost_only_after_the_bound_and_beats_of_this_watch(watch):
    assert beat(watch, 1) is None
    frozen = {f"{pod.PULSE}1": "1 1", f"{pod.PULSE}2": "7 7"}
    for k in range(2, 14):
        assert beat(watch, k, {**frozen, f"{pod.PULSE}2": f"{k} {k}"}) is None
    assert beat(watch, 14, frozen) == (3, "process 1 of 3 stopped answering (lost) at step 1")
    watch.step = 9  # this process is further on than the lost one's last pulse said
    assert beat(watch, 15, frozen) == (3, "process 1 of 3 stopped answering (lost) at step 9")


def test_a_stalled_watch_does_not_blame_the_others(watch):
    assert beat(watch, 1) is None
    # This watch was not scheduled for 60 s: the others' pulses it reads are old news, not silence.
    assert watch._judge(2, 61 * INTERVAL, {f"{pod.PULSE}{j}": "1 1" for j in (1, 2)}, {}, {}) is None


def test_an_error_waits_for_the_verdict_on_a_silent_process_up_to_the_timeout(monkeypatch):
    """A collective's error right after another process vanished: the watch's verdict on it may come later than its
    own rule (lost_after + 3 beats) on a loaded machine, so `settle` waits up to the whole timeout for it, never
    calling the error this process's own before; once every other process beats again, it returns at once."""
    import threading
    import time

    w = pod._Watch("train.py", timeout_s=24 * 0.05)  # beats of 0.05 s, lost after 0.6 s, at most 1.2 s
    now = time.monotonic()
    w._seen = {1: (None, now, 0)}
    monkeypatch.setattr(pod, "_watch", w)
    start = time.monotonic()
    pod.settle(RuntimeError("Gloo AllGather failed: Connection closed by peer"))
    assert time.monotonic() - start >= w.timeout                       # process 1 never beat again
    threading.Timer(0.2, lambda: w._seen.update({1: ("2 7", time.monotonic(), 2)})).start()
    start = time.monotonic()
    pod.settle(RuntimeError("this process's own"))
    assert 0.2 <= time.monotonic() - start < w.timeout                  # process 1 beat: the error is this one's
