"""The job on a TPU VM worker, detached from the SSH session that starts it, and its state under MODEL_DIR.

    python -m launch.job --detach --model_dir=gs://B/run --launch_id=ID --node=NODE -- TRAIN.PY ARGUMENTS
    python -m launch.job --stop --launch_id=ID        # SIGTERM to that job (train.py saves), SIGKILL after a grace

`launch.tpu` starts it with `--detach` on every worker: it leads a session of its own and outlives the SSH
connection. It runs
`python train.py --distributed ARGS` and, every `--heartbeat_s` seconds and at the end, writes through `storage`:
- `MODEL_DIR/launch/<NODE>-w<I>.json` (I: the worker's index in its slice), the job's state: `launch_id`, `state`
  (`running`; then `finished` with exit code 0, `failed` with another exit code, or `stopped` when the job was sent
  SIGTERM, with train.py's exit code), `exit_code`, `step` (the last step train.py logged, or the step it resumed
  at: a run resumed at its last step logs none; process 0 logs them), `heartbeat` (a counter: the launcher sees a
  job as alive while it grows, whatever the clocks say), `host`, `pid`;
- `MODEL_DIR/launch/logs/<NODE>-w<I>/<launch_id>/<N>.txt`, train.py's output since the previous write (one new small
  object per write: an object store has no append), which the launcher streams and which outlive the VM.
A storage error is logged and retried at the next heartbeat; it never stops training. The same output goes to
`launch_logs/<launch_id>.log` on the worker.

Cluster: on Cloud TPU VMs JAX finds the other workers itself. Where it cannot (the workers of a rehearsal), the
variables DOCMIX_COORDINATOR_ADDRESS, DOCMIX_NUM_PROCESSES and DOCMIX_PROCESS_ID become train.py's
--coordinator_address, --num_processes and --process_id. The worker index I is TPU_WORKER_ID, else the VM's
metadata (`agent-worker-number`, as JAX reads it), else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import storage

FINAL_STATES = ("finished", "failed", "stopped")
CLUSTER_ENV = {"DOCMIX_COORDINATOR_ADDRESS": "--coordinator_address", "DOCMIX_NUM_PROCESSES": "--num_processes",
               "DOCMIX_PROCESS_ID": "--process_id"}
LOCAL_DIR = pathlib.Path("launch_logs")  # relative to the job's working directory (the code folder)
STEP = re.compile(rb"\bstep (\d+) loss |\bresuming from \S+/(\d+)\s*$")
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"


def state_dir(model_dir: str) -> storage.Path:
    return storage.Path(model_dir) / "launch"


def read_states(model_dir: str) -> dict[str, dict[str, Any]]:
    """Worker key (`NODE-wI`) -> its job's last written state; a state being rewritten is skipped this time."""
    folder, states = state_dir(model_dir), {}
    if not folder.exists():
        return states
    for path in folder.glob("*.json"):
        try:
            states[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return states


def log_chunks(model_dir: str, worker: str, launch_id: str, after: int) -> list[tuple[int, str]]:
    """(number, text) of the log objects of one worker's job numbered above `after`, in order (they are numbered
    1, 2, ... without gaps, so this reads only the new ones)."""
    folder, chunks = state_dir(model_dir) / "logs" / worker / launch_id, []
    while (folder / f"{after + len(chunks) + 1:08d}.txt").exists():
        n = after + len(chunks) + 1
        chunks.append((n, (folder / f"{n:08d}.txt").read_bytes().decode(errors="replace")))
    return chunks


def worker_index() -> int:
    if os.environ.get("TPU_WORKER_ID", "").isdigit():
        return int(os.environ["TPU_WORKER_ID"])
    try:
        request = urllib.request.Request(METADATA, headers={"Metadata-Flavor": "Google"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as response:
            return int(response.read().decode().strip())
    except (OSError, ValueError):
        return 0


def cluster_flags(env: dict[str, str]) -> list[str]:
    return [f"{flag}={env[name]}" for name, flag in CLUSTER_ENV.items() if env.get(name)]


class Job:
    """train.py as a child process, its output collected, its state written every `heartbeat_s` seconds."""

    def __init__(self, model_dir: str, launch_id: str, worker: str, train_args: Sequence[str], heartbeat_s: float):
        self.model_dir, self.launch_id, self.worker = model_dir, launch_id, worker
        self.heartbeat_s = heartbeat_s
        self.command = [sys.executable, "train.py", "--distributed", *cluster_flags(dict(os.environ)), *train_args]
        self.state: dict[str, Any] = {"launch_id": launch_id, "worker": worker, "host": socket.gethostname(),
                                      "pid": os.getpid(), "state": "running", "exit_code": None, "step": None,
                                      "heartbeat": 0, "heartbeat_s": heartbeat_s, "signal": None}
        self._pending: list[bytes] = []
        self._chunk = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.proc: subprocess.Popen | None = None

    def _on_sigterm(self, signum, frame) -> None:
        self.state["signal"] = "SIGTERM"
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # train.py saves a checkpoint and exits 0

    def _read_output(self, log_file) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            log_file.write(line)
            log_file.flush()
            match = STEP.search(line)
            with self._lock:
                self._pending.append(line)
                if match:
                    self.state["step"] = int(match.group(1) or match.group(2))

    def _write(self) -> None:
        """One heartbeat: the output since the last one as a new log object, then the state (never raises)."""
        with self._lock:
            text, self._pending = b"".join(self._pending), []
        try:
            if text:
                folder = state_dir(self.model_dir) / "logs" / self.worker / self.launch_id
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{self._chunk + 1:08d}.txt").write_bytes(text)
                self._chunk += 1
            self.state["heartbeat"] += 1
            path = state_dir(self.model_dir) / f"{self.worker}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.state))
        except Exception as e:  # noqa: BLE001 -- storage trouble must not stop training; the next beat retries
            with self._lock:
                self._pending.insert(0, text)
            print(f"launch.job: writing the job state to {self.model_dir} failed ({e}); retrying", file=sys.stderr)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._write()

    def run(self) -> int:
        LOCAL_DIR.mkdir(exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        with open(LOCAL_DIR / f"{self.launch_id}.log", "ab") as log_file:
            try:
                self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            except OSError as e:
                self._pending.append(f"launch.job: cannot start train.py: {e}\n".encode())
                self.state.update(state="failed", exit_code=127)
                self._write()
                return 127
            reader = threading.Thread(target=self._read_output, args=(log_file,), daemon=True)
            reader.start()
            self._write()
            beat = threading.Thread(target=self._beat, daemon=True)
            beat.start()
            code = self.proc.wait()
            reader.join(timeout=60)
            self._stop.set()
            beat.join()
        final = "stopped" if self.state["signal"] else "finished" if code == 0 else "failed"
        self.state.update(state=final, exit_code=code)
        self._write()
        return code


def stop(launch_id: str, grace_s: float) -> int:
    """SIGTERM to the job's process group (the job and train.py), SIGKILL after `grace_s`; 0 when it is gone."""
    pid_file = LOCAL_DIR / f"{launch_id}.pid"
    if not pid_file.exists():
        return 0
    pgid = int(pid_file.read_text())
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return 0
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return 0
            time.sleep(0.2)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m launch.job", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model_dir", help="the run's MODEL_DIR (where the state and logs go)")
    parser.add_argument("--launch_id", required=True, help="this launch's id (one per start of the job)")
    parser.add_argument("--node", default="tpu", help="the TPU VM (node) this worker belongs to")
    parser.add_argument("--heartbeat_s", type=float, default=10.0, help="seconds between state and log writes")
    parser.add_argument("--detach", action="store_true", help="return at once; the job runs on in its own "
                        "session (it outlives the SSH connection that started it)")
    parser.add_argument("--stop", action="store_true", help="stop the job of --launch_id on this worker")
    parser.add_argument("--grace_s", type=float, default=120.0, help="with --stop: seconds before SIGKILL")
    args = parser.parse_args(ours)
    if args.stop:
        return stop(args.launch_id, args.grace_s)
    if not args.model_dir:
        parser.error("--model_dir is required")
    if args.detach and os.fork() > 0:
        return 0  # the SSH session's process; the child leads a new session, out of reach of the session's hangup
    if args.detach:
        os.setsid()
    LOCAL_DIR.mkdir(exist_ok=True)
    (LOCAL_DIR / f"{args.launch_id}.pid").write_text(str(os.getpgrp()))
    job = Job(args.model_dir, args.launch_id, f"{args.node}-w{worker_index()}", train_args, args.heartbeat_s)
    return job.run()


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m launch.job"))
