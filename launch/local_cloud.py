"""A Cloud TPU stand-in on this machine that understands the gcloud commands launch.tpu sends, and misbehaves on
request: the cloud of a rehearsal (`launch.tpu --rehearse`) and of the launcher's tests.

    python -m launch.local_cloud --root=DIR compute tpus tpu-vm create NAME ...      # as `gcloud ...`
    python -m launch.local_cloud --root=DIR pip install -r FILE ...                  # a worker venv's pip

DIR/cloud.json configures it: `workers` per node, `devices` (fake CPU devices per worker), `env` (added to every
worker's environment, e.g. a GCS emulator's), `faults` (below). Nodes (TPU VMs) and queued resources are JSON files
under DIR with their state (READY, PREEMPTED, ...). Every worker of every node has its own home folder, empty when
the node is created and gone when it is deleted or preempted (a VM's disk), and runs `ssh` commands with bash in
that home, with its own working directory and environment: TPU_WORKER_ID, the DOCMIX_* cluster variables that join
the workers' train.py processes (launch.job), fake CPU devices, CPU-only JAX. `python3.11 -m venv` in a worker gives
a venv whose python is this interpreter and whose pip only checks that the requirements are installed here (a
rehearsal installs nothing). A preemption does what a VM's shutdown does to its processes: SIGTERM to every job
(train.py saves), SIGKILL after a grace, then the node is PREEMPTED and its disks are gone.

Faults (each fires once, in order of the list; `fired.json` records them):
- {"kind": "preempt", "phase": "create" | "setup" | "sync" | "start"}: the node is preempted when that command comes;
- {"kind": "preempt", "phase": "train", "step": N}: preempted at the first look at its state after worker 0's job
  logged step N;
- {"kind": "ssh_drop", "phase": "setup" | "sync" | "start" | "stop"}: that SSH command runs on every worker, then
  the connection "drops" (exit 255): the job it started keeps running;
- {"kind": "describe_error", "phase": "train", "step": N}: one `describe` fails as gcloud does without a network
  (not NOT_FOUND), once worker 0's job logged step N.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import repo

PREEMPT_GRACE_S = 120.0
STEP = re.compile(r"\bstep (\d+) loss ")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class LocalCloud:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.config = json.loads((root / "cloud.json").read_text())

    # -- state ---------------------------------------------------------------------------------------------------
    def _file(self, kind: str, name: str) -> pathlib.Path:
        return self.root / kind / f"{name}.json"

    def node(self, name: str) -> dict[str, Any] | None:
        path = self._file("nodes", name)
        return json.loads(path.read_text()) if path.exists() else None

    def save_node(self, name: str, node: dict[str, Any]) -> None:
        self._file("nodes", name).parent.mkdir(parents=True, exist_ok=True)
        self._file("nodes", name).write_text(json.dumps(node))

    def homes(self, name: str) -> list[pathlib.Path]:
        node = self.node(name)
        return [] if node is None else [self.root / "homes" / name / str(node["generation"]) / f"w{i}"
                                        for i in range(node["workers"])]

    def fault(self, phase: str, kinds: Sequence[str] = ("preempt", "ssh_drop"), step: int | None = None) -> str | None:
        """The kind of the first unfired fault for `phase` (marking it fired), or None."""
        fired_path = self.root / "fired.json"
        fired = json.loads(fired_path.read_text()) if fired_path.exists() else []
        for i, f in enumerate(self.config.get("faults", [])):
            if i in fired or f["phase"] != phase or f["kind"] not in kinds:
                continue
            if phase == "train" and (step is None or step < f.get("step", 0)):
                return None
            fired_path.write_text(json.dumps(fired + [i]))
            return f["kind"]
        return None

    # -- nodes ---------------------------------------------------------------------------------------------------
    def create(self, names: Sequence[str], group: str) -> int:
        port = free_port()  # the coordinator of the job's train.py processes (one per slice group)
        for index, name in enumerate(names):
            old = self.node(name)
            if old is not None and old["state"] != "DELETED":
                print(f"ERROR: (gcloud) {name} already exists", file=sys.stderr)
                return 1
            generation = (old or {}).get("generation", 0) + 1
            self.save_node(name, {"state": "READY", "workers": self.config["workers"], "generation": generation,
                                  "group": group, "index": index, "nodes": len(names), "port": port})
            for home in self.homes(name):
                home.mkdir(parents=True)
        if self.fault("create", ("preempt",)):
            for name in names:
                self.preempt(name)
            print("ERROR: (gcloud) the TPU was preempted while it was being created", file=sys.stderr)
            return 1
        return 0

    def stop_jobs(self, name: str, grace_s: float) -> None:
        """SIGTERM to every job on the node's workers, SIGKILL to what is left after `grace_s`."""
        groups = [int(p.read_text()) for home in self.homes(name) for p in home.glob("docmix/launch_logs/*.pid")]
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            alive = []
            for pgid in groups:
                try:
                    os.killpg(pgid, sig)
                    alive.append(pgid)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while alive and time.monotonic() < deadline:
                alive = [g for g in alive if _alive(g)]
                time.sleep(0.2)

    def preempt(self, name: str) -> None:
        node = self.node(name)
        node["state"] = "PREEMPTED"
        self.save_node(name, node)
        self.stop_jobs(name, PREEMPT_GRACE_S)
        shutil.rmtree(self.root / "homes" / name, ignore_errors=True)

    def delete(self, names: Sequence[str]) -> int:
        for name in names:
            node = self.node(name)
            if node is not None and node["state"] != "DELETED":
                self.stop_jobs(name, 0.0)
                shutil.rmtree(self.root / "homes" / name, ignore_errors=True)
                node["state"] = "DELETED"
                self.save_node(name, node)
        return 0

    def delete_all(self) -> None:
        """Deletes every node (its jobs killed): the end of a rehearsal or a test, whatever happened."""
        self.delete([p.stem for p in (self.root / "nodes").glob("*.json")])

    def describe(self, name: str) -> int:
        node = self.node(name)
        if node is None or node["state"] == "DELETED":
            print(f"ERROR: (gcloud) NOT_FOUND: {name}", file=sys.stderr)
            return 1
        if node["state"] == "READY" and self.fault("train", ("describe_error",), self.logged_step(name)):
            print("ERROR: (gcloud) There was a problem refreshing your current auth tokens: Unable to connect",
                  file=sys.stderr)
            return 1
        if node["state"] == "READY" and self.fault("train", ("preempt",), self.logged_step(name)):
            self.preempt(name)
            node = self.node(name)
        print(json.dumps({"name": name, "state": node["state"],
                          "networkEndpoints": [{"ipAddress": "127.0.0.1"}] * node["workers"]}))
        return 0

    def logged_step(self, name: str) -> int | None:
        steps = [int(m) for home in self.homes(name)[:1] for log in home.glob("docmix/launch_logs/*.log")
                 for m in STEP.findall(log.read_text(errors="replace"))]
        return max(steps, default=None)

    # -- workers -------------------------------------------------------------------------------------------------
    def worker_env(self, name: str, worker: int, home: pathlib.Path) -> dict[str, str]:
        node = self.node(name)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        for sub in ("cache", "tmp"):
            (home / sub).mkdir(exist_ok=True)
        env.update(self.config.get("env", {}))
        env.update(HOME=str(home), PATH=f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                   TPU_WORKER_ID=str(worker), JAX_PLATFORMS="cpu", TMPDIR=str(home / "tmp"),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={self.config.get('devices', 1)}",
                   DOCMIX_CACHE=str(home / "cache"), DOCMIX_STORAGE_CACHE=str(home / "cache"),
                   DOCMIX_COORDINATOR_ADDRESS=f"localhost:{node['port']}",
                   DOCMIX_NUM_PROCESSES=str(node["nodes"] * node["workers"]),
                   DOCMIX_PROCESS_ID=str(node["index"] * node["workers"] + worker))
        return env

    def ssh(self, name: str, worker: str, command: str) -> int:
        node = self.node(name)
        if node is None or node["state"] != "READY":
            print(f"ssh: connect to host {name}: Connection refused", file=sys.stderr)
            return 255
        phase = _phase(command)
        if phase and self.fault(phase, ("preempt",)):
            self.preempt(name)
            print(f"Connection to {name} closed by remote host.", file=sys.stderr)
            return 255
        homes = self.homes(name)
        chosen = range(len(homes)) if worker == "all" else [int(worker)]
        procs = [subprocess.Popen(["bash", "-c", command], cwd=homes[i], env=self.worker_env(name, i, homes[i]))
                 for i in chosen]
        codes = [p.wait() for p in procs]
        if phase and self.fault(phase, ("ssh_drop",)):
            print(f"Connection to {name} closed by remote host.", file=sys.stderr)
            return 255
        return max(codes, default=0)

    def scp(self, local: str, target: str) -> int:
        name, _, remote = target.partition(":")
        node = self.node(name)
        if node is None or node["state"] != "READY":
            return 255
        if self.fault("sync", ("preempt",)):
            self.preempt(name)
            return 255
        for home in self.homes(name):
            shutil.copyfile(local, home / remote)
        return 0


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _phase(command: str) -> str | None:
    if "launch.job" in command:
        return "stop" if "--stop" in command else "start"
    if "pip" in command:
        return "setup"
    if "tar -x" in command:
        return "sync"
    return None


def _flag(args: Sequence[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def check_requirements(files: Sequence[str]) -> int:
    """A worker venv's `pip install -r FILE...`: every requirement must already be satisfied here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    pending = list(files)
    while pending:
        path = pathlib.Path(pending.pop())
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                pending.append(str(path.parent / line[3:].strip()))
            elif line:
                req = Requirement(line)
                try:
                    if not req.specifier.contains(metadata.version(req.name), prereleases=True):
                        missing.append(f"{line} (installed: {metadata.version(req.name)})")
                except metadata.PackageNotFoundError:
                    missing.append(f"{line} (not installed)")
    for line in missing:
        print(f"pip (local cloud): a TPU VM would install {line}", file=sys.stderr)
    return 1 if missing else 0


def make_bin(root: pathlib.Path) -> None:
    """The workers' `python3.11`: `-m venv DIR` makes a venv of this interpreter with a checking pip."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    python, package = shlex.quote(sys.executable), shlex.quote(str(repo.ROOT))
    pip = f"PYTHONPATH={package} exec {python} -m launch.local_cloud --root={shlex.quote(str(root))} pip"
    script = (f"#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = venv ]; then\n  mkdir -p \"$3/bin\"\n"
              f"  printf '#!/bin/sh\\nexec {python} \"$@\"\\n' > \"$3/bin/python\"\n"
              f"  printf '#!/bin/sh\\n{pip} \"$@\"\\n' > \"$3/bin/pip\"\n"
              f"  chmod +x \"$3/bin/python\" \"$3/bin/pip\"\n  exit 0\nfi\nexec {python} \"$@\"\n")
    (bin_dir / "python3.11").write_text(script)
    (bin_dir / "python3.11").chmod(0o755)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = pathlib.Path(argv.pop(0).split("=", 1)[1])
    cloud = LocalCloud(root)
    if argv[0] == "pip":
        if "install" in argv and "--upgrade" in argv:
            return 0
        return check_requirements([argv[i + 1] for i, a in enumerate(argv) if a == "-r"])
    words = [a for a in argv if not a.startswith("--")]
    verb, name = words[3:5] if words[2] in ("tpu-vm", "queued-resources") else (None, None)
    queued = words[2] == "queued-resources"
    if verb == "create":
        count, prefix = _flag(argv, "node-count"), _flag(argv, "node-prefix")
        nodes = [f"{prefix}-{i}" for i in range(int(count))] if count else [_flag(argv, "node-id") or name]
        if queued:
            cloud._file("queued", name).parent.mkdir(parents=True, exist_ok=True)
            cloud._file("queued", name).write_text(json.dumps({"state": "ACTIVE", "nodes": nodes}))
        return cloud.create(nodes, name)
    if verb == "describe":
        if queued:
            path = cloud._file("queued", name)
            print(json.loads(path.read_text())["state"] if path.exists() else "")
            return 0 if path.exists() else 1
        return cloud.describe(name)
    if verb == "delete":
        if queued:
            path = cloud._file("queued", name)
            nodes = json.loads(path.read_text())["nodes"] if path.exists() else []
            path.unlink(missing_ok=True)
            return cloud.delete(nodes)
        return cloud.delete([name])
    if verb == "ssh":
        return cloud.ssh(name, _flag(argv, "worker") or "0", _flag(argv, "command"))
    if verb == "scp":
        return cloud.scp(words[4], words[5])
    print(f"local cloud: unsupported command: gcloud {shlex.join(argv)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
