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
    """Writes the lock as another run's renewal would: atomically (a reader never sees it half written)."""
    record = {"started": 0, "heartbeat": time.time(), "command": "train.py", "token": "theirs", **holder}
    run_lock.LocalStore().overwrite(str(path / run_lock.LOCK_NAME), json.dumps(record).encode())


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
    # The other run's write lands right after a renewal, well before the next one reads the lock (a check-then-write
    # store has no compare-and-swap: a write between the renewer's read and its write would be overwritten).
    lock = run_lock.RunLock(str(tmp_path), renew_s=0.3)
    with lock:
        first = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"]
        deadline = time.time() + 30
        while json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat was never renewed"
            time.sleep(0.02)
        write_lock(tmp_path, host="tpu-vm-7", pid=1, heartbeat=time.time())  # another run broke and took it
        lock._renewer.join(timeout=30)
        assert not lock._renewer.is_alive()
        assert "no longer holds the writer lock" in caplog.text
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == "tpu-vm-7"  # theirs, left alone


def test_train_py_refuses_a_locked_model_dir_before_any_work(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    write_lock(model_dir, host=socket.gethostname(), pid=os.getpid())   # this live test process holds it
    proc = subprocess.run(train_cmd(model_dir), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "another run is writing to this MODEL_DIR" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == [run_lock.LOCK_NAME]   # nothing written, nothing compiled
