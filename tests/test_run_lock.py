"""One writer per MODEL_DIR: a second train.py is refused before any work, naming the holder; stale locks."""
import json
import os
import socket
import subprocess
import sys

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
    (path / run_lock.LOCK_NAME).write_text(json.dumps({"started": 0, "command": "train.py", **holder}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_local_process_is_broken(tmp_path, caplog):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    with run_lock.RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid() == lock.record["pid"]
    assert "stale" in caplog.text


def test_lock_of_another_host_is_never_broken_and_never_released_by_us(tmp_path):
    write_lock(tmp_path, host="tpu-vm-7", pid=dead_pid())
    with pytest.raises(run_lock.RunLocked, match="tpu-vm-7"):
        run_lock.RunLock(str(tmp_path)).acquire()
    run_lock.RunLock(str(tmp_path)).release()
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == "tpu-vm-7"


def test_train_py_refuses_a_locked_model_dir_before_any_work(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    write_lock(model_dir, host=socket.gethostname(), pid=os.getpid())   # this live test process holds it
    proc = subprocess.run(train_cmd(model_dir), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "another run is writing to this MODEL_DIR" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == [run_lock.LOCK_NAME]   # nothing written, nothing compiled
