"""A harness for real multi-process runs of train.py on one machine: N processes joined by `jax.distributed` through a
coordinator on a free localhost port, each with its own fake CPU devices, so the mesh spans processes.

Every process gets its own session (process group), stdout and stderr go to files, every wait has a deadline, and
leaving the `Cluster` context SIGKILLs whatever is still running (children included), so a failing or hanging test
leaves no orphans and fails with each process's stderr.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
TAIL = 3000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one train.py process: `devices` fake CPU devices, CPU only, offline."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def distributed_flags(port: int, num_processes: int, process_id: int) -> list[str]:
    """The flags that join process `process_id` to a run of `num_processes` processes coordinated on localhost."""
    return ["--distributed", f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
            f"--process_id={process_id}"]


class Cluster:
    """`num_processes` train.py processes with `devices` CPU devices each, all given `args` (plus the distributed
    flags when there is more than one process, and process i its `extra[i]`), each started in `cwds[i]` (default: the
    repository). Use as a context manager."""

    def __init__(self, num_processes: int, devices: int, args: Sequence[str], log_dir: pathlib.Path,
                 env: dict[str, str] | None = None, extra: Sequence[Sequence[str]] | None = None,
                 cwds: Sequence[pathlib.Path] | None = None):
        self.num_processes, self.devices, self.args = num_processes, devices, list(args)
        self.log_dir, self.env = pathlib.Path(log_dir), env
        self.extra = [list(e) for e in extra] if extra else [[] for _ in range(num_processes)]
        self.cwds = list(cwds) if cwds else [REPO] * num_processes
        self.procs: list[subprocess.Popen] = []
        self._files: list = []

    def command(self, process_id: int, port: int) -> list[str]:
        flags = distributed_flags(port, self.num_processes, process_id) if self.num_processes > 1 else []
        return [sys.executable, str(REPO / "train.py"), *self.args, *self.extra[process_id], *flags]

    def __enter__(self) -> "Cluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        for i in range(self.num_processes):
            out = open(self.log_dir / f"process_{i}.out", "w")
            err = open(self.log_dir / f"process_{i}.err", "w")
            self._files += [out, err]
            self.procs.append(subprocess.Popen(self.command(i, port), cwd=self.cwds[i],
                                               env=process_env(self.devices, self.env), stdout=out, stderr=err,
                                               start_new_session=True))
        return self

    def __exit__(self, *exc) -> None:
        self.kill(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for f in self._files:
            f.close()

    def kill(self, sig: int, which: Sequence[int] | None = None) -> None:
        """Sends `sig` to the process groups of the processes `which` (default: all) that are still running."""
        for i in range(self.num_processes) if which is None else which:
            if self.procs[i].poll() is None:
                try:
                    os.killpg(self.procs[i].pid, sig)
                except ProcessLookupError:
                    pass

    def stdout(self, i: int) -> str:
        return (self.log_dir / f"process_{i}.out").read_text()

    def stderr(self, i: int) -> str:
        return (self.log_dir / f"process_{i}.err").read_text()

    def report(self, why: str) -> str:
        codes = [p.poll() for p in self.procs]
        parts = [f"{why}; exit codes {codes} (None = still running)"]
        for i in range(self.num_processes):
            parts.append(f"--- process {i} stderr (last {TAIL} chars) ---\n{self.stderr(i)[-TAIL:]}")
        return "\n".join(parts)

    def wait(self, timeout: float) -> list[int]:
        """Exit codes of all processes; kills them all and fails with their stderr after `timeout` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(p.poll() is not None for p in self.procs):
                return [p.returncode for p in self.procs]
            time.sleep(0.1)
        message = self.report(f"processes still running after {timeout:.0f}s (killed)")
        self.kill(signal.SIGKILL)
        raise AssertionError(message)

    def wait_ok(self, timeout: float) -> None:
        codes = self.wait(timeout)
        if any(codes):
            raise AssertionError(self.report("a process failed"))

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls `condition` while every process is running; fails (after killing all) if one exits first or time
        runs out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            if any(p.poll() is not None for p in self.procs):
                if condition():  # met just before the exit, between our two looks
                    return
                message = self.report(f"a process exited before {what}")
                self.kill(signal.SIGKILL)
                raise AssertionError(message)
            time.sleep(0.05)
        message = self.report(f"timed out after {timeout:.0f}s waiting for {what} (killed)")
        self.kill(signal.SIGKILL)
        raise AssertionError(message)


def run(num_processes: int, devices: int, args: Sequence[str], log_dir: pathlib.Path, timeout: float,
        env: dict[str, str] | None = None) -> Cluster:
    """Runs the processes to the end; fails with their stderr if one exits non-zero or time runs out."""
    with Cluster(num_processes, devices, args, log_dir, env) as cluster:
        cluster.wait_ok(timeout)
    return cluster


def metrics(model_dir: pathlib.Path) -> list[dict]:
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_steps(model_dir: pathlib.Path) -> int:
    """Number of metrics records written so far (one per step with TrainConfig.log_every=1)."""
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def losses(model_dir: pathlib.Path) -> dict[int, float]:
    """step -> loss; after a resume the re-run steps' records win."""
    return {r["step"]: r["loss"] for r in metrics(model_dir)}
