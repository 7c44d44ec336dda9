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


def test_an_error_counts_as_this_processs_own_only_after_two_beats_of_every_other_one(monkeypatch):
    """A collective's error right after another process vanished: `settle` waits for two beats of every other
    process written after the error (one more may have been on its way from the one that died: it proves nothing),
    up to the whole timeout, leaving the verdict to the watch; once every other process beat twice, it returns."""
    import threading
    import time

    class Service:  # the coordination service's pulses: process 1's beat count and step
        pulses = {f"{pod.PULSE}0": "40 7", f"{pod.PULSE}1": "40 7"}

        def key_value_dir_get(self, prefix):
            return list(self.pulses.items())

    service = Service()
    monkeypatch.setattr(pod.coordination, "client", lambda: service)
    w = pod._Watch("train.py", timeout_s=24 * 0.05)  # beats of 0.05 s, at most 1.2 s
    w.me, w.n = 0, 2
    monkeypatch.setattr(pod, "_watch", w)
    threading.Timer(0.1, lambda: service.pulses.update({f"{pod.PULSE}1": "41 7"})).start()  # the one on its way
    start = time.monotonic()
    pod.settle(RuntimeError("Gloo AllGather failed: Connection closed by peer"))
    assert time.monotonic() - start >= w.timeout
    threading.Timer(0.2, lambda: service.pulses.update({f"{pod.PULSE}1": "43 7"})).start()
    start = time.monotonic()
    pod.settle(RuntimeError("this process's own"))
    assert 0.2 <= time.monotonic() - start < w.timeout


def test_an_error_in_a_together_block_is_settled_before_it_is_reported(monkeypatch):
    """A collective inside `consensus.together` (an export's gather) fails because another process died: the error
    waits for the watch's verdict (`settle`) before it is published as this process's own, or the watch, ending
    this process for the lost one, would exit with this process's code (4) instead of naming the lost process."""
    from trainer import consensus

    calls = []
    monkeypatch.setattr(pod, "settle", lambda e: calls.append(("settle", e)))
    monkeypatch.setattr(pod, "report_failure", lambda e, what="": calls.append(("report", e)))
    error = RuntimeError("Gloo AllGather failed: Connection closed by peer")
    with pytest.raises(RuntimeError):
        with consensus.together("exporting runs/x/hf"):
            raise error
    assert calls == [("settle", error), ("report", error)]
