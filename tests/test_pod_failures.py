"""Nothing hangs a pod: real `train.py --distributed` processes on localhost (tests/multiproc.py), each failure ending
every process with one line and an exit code from the table.

- Processes given different arguments all exit 2 at start, naming the binding, before MODEL_DIR is touched.
- A relative MODEL_DIR from different working directories (a MODEL_DIR the hosts do not share) is found at start.
- MODEL_DIR's writer lock held by another run stops every process (not only process 0, which takes it).
- kill -9 of process 1 mid-run: process 0 ends within --failure_timeout with exit 3 and one line naming process 1,
  not JAX's abort (exit 134 and a C++ stack).
"""
import json
import os
import socket
import time
import signal

import pytest

from tests.multiproc import Cluster, logged_steps

ARGS = ["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
        "--gin.TRAIN_STEPS=8", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=None",
        "--gin.TrainConfig.peak_flops=1e12", "--gin.CheckpointConfig.export_at_end=False"]
TIMEOUT = 600
BOUND = 20  # --failure_timeout of the kill test


def ended_alike(cluster: Cluster, code: int, text: str) -> None:
    """Every process exited with `code` and said `text`."""
    codes = cluster.wait(TIMEOUT)
    assert codes == [code] * cluster.num_processes, cluster.report(f"expected exit {code} everywhere")
    for i in range(cluster.num_processes):
        assert text in cluster.stderr(i), cluster.report(f"process {i} did not say {text!r}")


def test_processes_given_different_arguments_stop_at_start_naming_the_binding(tmp_path):
    model_dir = tmp_path / "run"
    with Cluster(2, 1, [*ARGS, f"--gin.MODEL_DIR={model_dir}"], tmp_path / "logs",
                 extra=[["--gin.TRAIN_STEPS=4"], ["--gin.TRAIN_STEPS=8"]]) as cluster:
        ended_alike(cluster, 2, "the processes were given different configurations: TRAIN_STEPS = 4 on process 0, "
                                "8 on process 1")
    assert not model_dir.exists()


def test_model_dir_not_shared_between_hosts_is_found_at_start(tmp_path):
    """MODEL_DIR=run from two working directories: two different folders, as on hosts without a shared disk."""
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    for folder in hosts:
        folder.mkdir()
    with Cluster(2, 1, [*ARGS, "--gin.MODEL_DIR=run"], tmp_path / "logs", cwds=hosts) as cluster:
        ended_alike(cluster, 2, "MODEL_DIR=run is not the same storage on every process: process 1 of 2 cannot find "
                                f"the file process 0 wrote into it (process 0 resolves MODEL_DIR to "
                                f"{socket.gethostname()}:{hosts[0] / 'run'}, process 1 to "
                                f"{socket.gethostname()}:{hosts[1] / 'run'})")
    assert list((hosts[0] / "run").iterdir()) == [] and not (hosts[1] / "run").exists()  # the test file is gone


def test_writer_lock_held_by_another_run_stops_every_process(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
              "token": "another-run", "command": "python train.py (another run)"}
    (model_dir / "writer.lock").write_text(json.dumps(holder))
    with Cluster(2, 1, [*ARGS, f"--gin.MODEL_DIR={model_dir}"], tmp_path / "logs") as cluster:
        ended_alike(cluster, 2, "another run is writing to this MODEL_DIR")
        assert "process 0 of 2 failed while taking MODEL_DIR's writer lock: " in cluster.stderr(1)
    assert json.loads((model_dir / "writer.lock").read_text()) == holder


@pytest.mark.slow
def test_kill_9_of_one_process_ends_the_other_within_the_bound_naming_it(tmp_path):
    model_dir = tmp_path / "run"
    args = [*ARGS, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_EVERY=100000", f"--gin.MODEL_DIR={model_dir}",
            f"--failure_timeout={BOUND}"]
    with Cluster(2, 1, args, tmp_path / "logs") as cluster:
        cluster.wait_until(lambda: logged_steps(model_dir) >= 2, TIMEOUT, "step 2")
        killed = time.monotonic()
        cluster.kill(signal.SIGKILL, which=[1])
        code = cluster.wait(TIMEOUT)[0]
        took = time.monotonic() - killed
        err = cluster.stderr(0)
    assert code == 3, cluster.report("process 0 after kill -9 of process 1")
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: process 1 of 2 stopped answering (lost) at step "), err[-3000:]
    assert "Check failure stack trace" not in err and "Traceback" not in err, err[-3000:]
    assert took < BOUND + 10, f"process 0 ended {took:.0f}s after the kill (bound {BOUND}s)"  # 10 s: a loaded runner
