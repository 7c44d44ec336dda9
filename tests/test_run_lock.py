"""One writer per MODEL_DIR: a second train.py is refused before any work, naming the holder; stale locks."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.test_train_resume import REPO, env, train_cmd
from trainer import run_lock


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    first = run_lock.RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(run_lock.RunLocked) as refused:
        run_lock.RunLock(str(tmp_path)).acquire()
    assert f"pid {os.getpid()}" in str(refused.value) and socket.gethostname() in str(refused.value)
    assert f"delete {tmp_path}/{run_lock.LOCK_NAME}" in str(refused.value)
    first.release()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()
    with run_lock.RunLock(str(tmp_path)):                      # free again
        assert (tmp_path / run_lock.LOCK_NAME).exists()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def write_lock(path, **holder):
    """Writes the lock as another run would: created if absent, else replaced by compare-and-swap."""
    record = {"started": 0, "heartbeat": time.time(), "command": "train.py", "token": "theirs", **holder}
    store, lock = run_lock.LocalStore(), str(path / run_lock.LOCK_NAME)
    while not store.create_exclusive(lock, json.dumps(record).encode()):
        found = store.read(lock)
        if found is not None and store.replace(lock, json.dumps(record).encode(), found[1]):
            return


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_local_process_is_broken(tmp_path, caplog):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    with run_lock.RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid() == lock.record["pid"]
    assert "stale" in caplog.text


def test_live_lock_of_another_host_is_not_broken_nor_released_by_us(tmp_path):
    """A holder on another host that keeps renewing its heartbeat is alive: the run is refused once it renews."""
    write_lock(tmp_path, host="tpu-vm-7", pid=dead_pid())
    stop = threading.Event()

    def renew():
        while not stop.wait(0.05):
            write_lock(tmp_path, host="tpu-vm-7", pid=1)

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(run_lock.RunLocked, match="tpu-vm-7.*last heartbeat 0s ago"):
            run_lock.RunLock(str(tmp_path), renew_s=0.1, lease_s=30).acquire()
    finally:
        stop.set()
        renewer.join()
    run_lock.RunLock(str(tmp_path)).release()
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == "tpu-vm-7"


def test_unreadable_lock_is_refused_by_name_and_creation_leaves_no_temporary_files(tmp_path):
    (tmp_path / run_lock.LOCK_NAME).write_bytes(b"")       # not written by a RunLock: never broken, never removed
    with pytest.raises(run_lock.RunLocked, match="an unreadable lock record.*delete .*writer.lock"):
        run_lock.RunLock(str(tmp_path)).acquire()
    assert (tmp_path / run_lock.LOCK_NAME).read_bytes() == b""
    (tmp_path / run_lock.LOCK_NAME).unlink()
    store = run_lock.LocalStore()
    assert store.create_exclusive(str(tmp_path / "x"), b"1") and not store.create_exclusive(str(tmp_path / "x"), b"2")
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and (tmp_path / "x").read_bytes() == b"1"


def test_lock_works_on_a_mount_without_hard_links(tmp_path, monkeypatch):
    """gcsfuse (a bucket mounted on a TPU VM) refuses link(): the lock falls back to an exclusive create."""
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted", src)

    monkeypatch.setattr(run_lock.os, "link", no_links)
    with run_lock.RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["token"] == lock.record["token"]
        with pytest.raises(run_lock.RunLocked, match=f"pid {os.getpid()}"):
            run_lock.RunLock(str(tmp_path)).acquire()
    assert list(tmp_path.iterdir()) == []


def test_lock_of_a_vanished_host_is_broken_after_the_lease(tmp_path, caplog):
    """A run on a machine that vanished (a preempted TPU VM) cannot be asked whether its pid runs: a lock not renewed
    for LEASE_S is stale, at once when it is already that old, else after watching it that long."""
    write_lock(tmp_path, host="tpu-vm-7", pid=1, heartbeat=time.time() - run_lock.LEASE_S - 5)
    with run_lock.RunLock(str(tmp_path)):
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == socket.gethostname()
    assert "breaking the stale lock" in caplog.text and "tpu-vm-7" in caplog.text
    write_lock(tmp_path, host="tpu-vm-8", pid=1, heartbeat=time.time())
    start = time.time()
    with run_lock.RunLock(str(tmp_path), renew_s=0.1, lease_s=1.0):
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == socket.gethostname()
    assert 0.9 < time.time() - start < 20 and "waiting up to" in caplog.text


def test_holder_renews_its_heartbeat_and_notices_a_lost_lock(tmp_path, caplog):
    lock = run_lock.RunLock(str(tmp_path), renew_s=0.05)
    with lock:
        first = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"]
        deadline = time.time() + 30
        while json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat was never renewed"
            time.sleep(0.02)
        assert lock.lost is None
        write_lock(tmp_path, host="tpu-vm-7", pid=1, heartbeat=time.time())  # another run broke and took it
        lock._renewer.join(timeout=30)
        assert not lock._renewer.is_alive() and "tpu-vm-7" in lock.lost
        assert "no longer holds MODEL_DIR's writer lock" in caplog.text
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == "tpu-vm-7"  # theirs, left alone


class Interleaved:
    """`store` where another run's write lands right after the `nth` read: between a reader's look and its
    compare-and-swap, the moment a check-then-write lock loses to."""

    def __init__(self, store, nth: int, write):
        self.store, self.nth, self.write, self.reads = store, nth, write, 0

    def read(self, path):
        found = self.store.read(path)
        self.reads += 1
        if self.reads == self.nth:
            self.write()
        return found

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_renewal_never_overwrites_a_lock_taken_between_its_read_and_its_write(tmp_path):
    store = Interleaved(run_lock.LocalStore(), 1, lambda: write_lock(tmp_path, host="tpu-vm-7", pid=1))
    lock = run_lock.RunLock(str(tmp_path), store, renew_s=0.05)
    lock.acquire()
    lock._renewer.join(timeout=30)
    assert "tpu-vm-7" in lock.lost
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == "tpu-vm-7"
    lock.release()
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == "tpu-vm-7"


def test_a_stale_lock_renewed_while_being_broken_is_not_broken(tmp_path, caplog):
    """The breaker judged the lock stale from what it read; its holder (back from a stall) renewed it before the
    break: the break, a compare-and-swap against what was read, fails, and the run is refused naming the holder."""
    stale = time.time() - run_lock.LEASE_S - 5
    write_lock(tmp_path, host="tpu-vm-7", pid=1, heartbeat=stale)
    stop = threading.Event()

    def renewed():  # in place, atomically: the lock is never absent, so the breaker cannot take it while it renews
        record = {"started": 0, "heartbeat": time.time(), "command": "train.py", "token": "theirs",
                  "host": "tpu-vm-7", "pid": 1}
        (tmp_path / "renewed").write_text(json.dumps(record))
        os.replace(tmp_path / "renewed", tmp_path / run_lock.LOCK_NAME)

    def renew():
        while not stop.wait(0.05):
            renewed()

    renewer = threading.Thread(target=renew)
    store = Interleaved(run_lock.LocalStore(), 1,  # the holder renews right after the breaker's read
                        lambda: (renewed(), renewer.start()))
    try:
        with pytest.raises(run_lock.RunLocked, match="tpu-vm-7.*last heartbeat 0s ago"):
            run_lock.RunLock(str(tmp_path), store, renew_s=0.1).acquire()
    finally:
        stop.set()
        renewer.join()
    assert "breaking the stale lock" in caplog.text
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"] > stale


def test_train_py_refuses_a_locked_model_dir_before_any_work(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    write_lock(model_dir, host=socket.gethostname(), pid=os.getpid())   # this live test process holds it
    proc = subprocess.run(train_cmd(model_dir), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "another run is writing to this MODEL_DIR" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == [run_lock.LOCK_NAME]   # nothing written, nothing compiled


def test_a_run_that_loses_its_lock_stops_and_writes_nothing_more(tmp_path, monkeypatch, capsys):
    """train.py whose lock another run takes over mid-run (its heartbeat renewed every 0.1 s here): it stops at the
    next step boundary with exit status 2 and one line naming the new holder, and writes no further record,
    checkpoint or export to MODEL_DIR; the other run's lock is left as it is."""
    import train
    from tests.test_train_resume import TINY

    model_dir = tmp_path / "run"
    monkeypatch.setattr(run_lock, "RENEW_S", 0.1)
    taken: dict = {}
    done = threading.Event()

    def take_over():
        metrics = model_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            if done.wait(0.01):
                return
        write_lock(model_dir, host="tpu-vm-7", pid=1)
        taken["records"] = len(metrics.read_text().splitlines())

    thief = threading.Thread(target=take_over)
    thief.start()
    try:
        code = train.main([*TINY, f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=400", "--gin.BATCH_SIZE=8",
                           "--gin.CHECKPOINT_EVERY=1000", "--gin.TrainConfig.progress_bar=False"])
    finally:
        done.set()
        thief.join()
    assert code == 2, capsys.readouterr().err[-3000:]
    assert "now held by host 'tpu-vm-7'" in capsys.readouterr().err
    assert json.loads((model_dir / run_lock.LOCK_NAME).read_text())["host"] == "tpu-vm-7"
    logged = len((model_dir / "metrics.jsonl").read_text().splitlines())
    assert taken["records"] <= logged < 400
    assert not [p.name for p in (model_dir / "checkpoints").iterdir()]  # no step saved (no final save either)
    assert not (model_dir / "hf").exists()
