"""Run train.py on a Cloud TPU VM: create it, set it up, sync the code, train on every worker, relaunch after
preemption (resuming from the gs:// MODEL_DIR), delete it at the end.

    python -m launch.tpu --name=docmix-8b --zone=us-east5-a --accelerator_type=v5p-8 --spot [--queued] \
        [--runtime_version=v2-alpha-tpuv5] [--project=P] [--dry_run] -- \
        --gin_file=runs/midtrain.gin --gin.MODEL_DIR=gs://bucket/runs/welfare10 --gin.INIT_FROM=/mnt/llama-3.1-8b

Everything after `--` is passed to `python train.py --distributed` on all workers. Check first that the run fits the
slice: `python -m launch.aot` with the same flags and the slice's topology. Every cloud command is an argument list
run without a local shell (printed, not run, with `--dry_run`); the command each worker runs is quoted with
`shlex`, so arguments holding spaces, quotes or `$(...)` reach train.py unchanged. Preemption is told apart from a
failed run by the VM's state after the run command returns (PREEMPTED or gone: relaunch; READY: the run's own exit
status). Exit status: train.py's on the last attempt, 3 when relaunches ran out, 2 for a bad command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "$HOME/docmix"      # expanded by the worker's shell (the only unquoted part of a remote command)
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
GONE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "")


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    zone: str
    accelerator_type: str             # e.g. v5p-8, v6e-8, v5litepod-16
    runtime_version: str
    project: str | None = None
    spot: bool = False
    reserved: bool = False
    queued: bool = False              # create through a queued resource (waits for capacity)

    def where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def default_runtime(accelerator_type: str) -> str:
    family = accelerator_type.split("-")[0]
    if family not in RUNTIMES:
        raise ValueError(f"--accelerator_type {accelerator_type!r}: no default --runtime_version for {family!r} "
                         f"(known: {', '.join(RUNTIMES)}); pass --runtime_version")
    return RUNTIMES[family]


def create_commands(s: Slice) -> list[list[str]]:
    capacity = ["--spot"] if s.spot else ["--reserved"] if s.reserved else []
    if s.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "create", s.name, f"--node-id={s.name}",
                 f"--accelerator-type={s.accelerator_type}", f"--runtime-version={s.runtime_version}",
                 *capacity, *s.where()]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", s.name, f"--accelerator-type={s.accelerator_type}",
             f"--version={s.runtime_version}", *capacity, *s.where()]]


def queued_state_command(s: Slice) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", s.name, *s.where(),
            "--format=value(state.state)"]


def vm_state_command(s: Slice) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", s.name, *s.where(), "--format=value(state)"]


def delete_command(s: Slice) -> list[str]:
    if s.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", s.name, *s.where(), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s.where(), "--quiet"]


def on_all_workers(s: Slice, remote_command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", s.name, *s.where(), "--worker=all",
            f"--command={remote_command}"]


def sync_commands(s: Slice, archive: pathlib.Path) -> list[list[str]]:
    """Copy the code archive to every worker and unpack it into REMOTE_DIR (replacing only its code files)."""
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(archive), f"{s.name}:docmix.tar.gz", *s.where(),
            "--worker=all"]
    unpack = f'mkdir -p "{REMOTE_DIR}" && tar -xzf "$HOME/docmix.tar.gz" -C "{REMOTE_DIR}"'
    return [copy, on_all_workers(s, unpack)]


def setup_command(s: Slice) -> list[str]:
    """Python 3.11 (from the OS packages when missing), a venv and the pinned requirements with the TPU extra."""
    script = " && ".join([
        "set -e",
        "(command -v python3.11 >/dev/null || "
        "(sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv))",
        f'python3.11 -m venv "{REMOTE_DIR}/.venv"',
        f'"{REMOTE_DIR}/.venv/bin/pip" install -q --upgrade pip',
        f'"{REMOTE_DIR}/.venv/bin/pip" install -q -r "{REMOTE_DIR}/requirements-tpu.txt"',
    ])
    return on_all_workers(s, script)


def train_command(s: Slice, train_args: Sequence[str]) -> list[str]:
    """`python train.py --distributed ARGS` on every worker; each argument is shell-quoted for the remote shell."""
    remote = f'cd "{REMOTE_DIR}" && .venv/bin/python train.py ' + shlex.join(["--distributed", *train_args])
    return on_all_workers(s, remote)


def code_files(root: pathlib.Path = ROOT) -> list[str]:
    """The repository's files as a clone has them: `git ls-files` in a git checkout; elsewhere (a release tarball,
    a copied tree) every file not excluded by the top-level .gitignore (runs, caches, venvs stay home)."""
    if (root / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout
        return [name for name in listed.decode().split("\0") if name and (root / name).is_file()]
    patterns = [line.strip() for line in (root / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")] if (root / ".gitignore").is_file() else []

    def ignored(rel: pathlib.PurePosixPath) -> bool:
        for pattern in [*patterns, ".git/"]:
            anchored, body = pattern.startswith("/"), pattern.strip("/")
            candidates = [str(rel)] if anchored else [rel.name]
            if any(fnmatch.fnmatch(c, body) for c in candidates):
                return True
        return False

    files = []
    for folder, dirs, names in os.walk(root):
        base = pathlib.PurePosixPath(pathlib.Path(folder).relative_to(root).as_posix())
        dirs[:] = sorted(d for d in dirs if not ignored(base / d))
        files += [str(base / n) if str(base) != "." else n for n in sorted(names) if not ignored(base / n)]
    return files


def code_archive(destination: pathlib.Path, root: pathlib.Path = ROOT) -> pathlib.Path:
    """A .tar.gz of the repository's files (`code_files`) as they are in the working tree."""
    with tarfile.open(destination, "w:gz") as tar:
        for name in code_files(root):
            tar.add(root / name, arcname=name)
    return destination


def model_dir_of(train_args: Sequence[str]) -> str | None:
    for arg in train_args:
        if arg.startswith("--gin.MODEL_DIR="):
            return arg.split("=", 1)[1].strip("'\"")
    return None


@dataclasses.dataclass
class Launcher:
    """Runs (or, with dry_run, prints) the commands; `run` returns the exit status of one command."""
    slice: Slice
    dry_run: bool = False
    poll_seconds: float = 30.0
    out: Callable[[str], None] = print

    def run(self, command: list[str], capture: bool = False) -> tuple[int, str]:
        self.out(("(dry run) " if self.dry_run else "+ ") + shlex.join(command))
        if self.dry_run:
            return 0, "READY" if capture else ""
        done = subprocess.run(command, capture_output=capture, text=True)
        return done.returncode, (done.stdout or "").strip() if capture else ""

    def must(self, command: list[str]) -> None:
        rc, _ = self.run(command)
        if rc:
            raise RuntimeError(f"exit status {rc}: {shlex.join(command)}")

    def create(self) -> None:
        for command in create_commands(self.slice):
            self.must(command)
        while self.slice.queued:  # a queued resource becomes ACTIVE once capacity is granted
            rc, state = self.run(queued_state_command(self.slice), capture=True)
            if self.dry_run or state == "ACTIVE":
                break
            if state in ("FAILED", "SUSPENDED"):
                raise RuntimeError(f"queued resource {self.slice.name} is {state}")
            time.sleep(self.poll_seconds)

    def vm_state(self) -> str:
        rc, state = self.run(vm_state_command(self.slice), capture=True)
        return state if rc == 0 else ""   # describe fails once the VM is gone

    def train(self, train_args: Sequence[str], archive: pathlib.Path, max_relaunches: int, keep: bool) -> int:
        attempt = 0
        try:
            while True:
                self.create()
                for command in [*sync_commands(self.slice, archive), setup_command(self.slice)]:
                    self.must(command)
                rc, _ = self.run(train_command(self.slice, train_args))
                state = self.vm_state()
                if state not in GONE_STATES:
                    self.out(f"launch.tpu: train.py finished with exit status {rc} (VM {state})")
                    return rc
                attempt += 1
                if attempt > max_relaunches:
                    self.out(f"launch.tpu: preempted {attempt} times, no relaunches left")
                    return 3
                self.out(f"launch.tpu: VM {self.slice.name} is {state or 'gone'}: relaunch {attempt} of "
                         f"{max_relaunches}, resuming from MODEL_DIR")
                self.run(delete_command(self.slice))
        finally:
            if not keep:
                self.run(delete_command(self.slice))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--accelerator_type", required=True, help="e.g. v5p-8, v6e-8, v5litepod-16")
    parser.add_argument("--runtime_version", help="TPU software version (default: by accelerator family)")
    parser.add_argument("--project")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (cheaper; can be preempted)")
    capacity.add_argument("--reserved", action="store_true", help="use a reservation")
    parser.add_argument("--queued", action="store_true", help="create through a queued resource")
    parser.add_argument("--max_relaunches", type=int, default=10, help="relaunches after preemption")
    parser.add_argument("--poll_seconds", type=float, default=30.0, help="queued-resource polling interval")
    parser.add_argument("--keep", action="store_true", help="do not delete the VM at the end")
    parser.add_argument("--dry_run", action="store_true", help="print the gcloud commands instead of running them")
    args = parser.parse_args(ours)
    model_dir = model_dir_of(train_args)
    if not train_args or model_dir is None or not model_dir.startswith("gs://"):
        print("launch.tpu: pass train.py's flags after `--`, including --gin.MODEL_DIR=gs://... (a relaunched VM "
              "resumes from it; a local MODEL_DIR would be lost with the VM)", file=sys.stderr)
        return 2
    try:
        runtime = args.runtime_version or default_runtime(args.accelerator_type)
    except ValueError as e:
        print(f"launch.tpu: {e}", file=sys.stderr)
        return 2
    tpu = Slice(args.name, args.zone, args.accelerator_type, runtime, args.project, args.spot, args.reserved,
                args.queued)
    launcher = Launcher(tpu, dry_run=args.dry_run, poll_seconds=args.poll_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        archive = code_archive(pathlib.Path(tmp) / "docmix.tar.gz")
        try:
            return launcher.train(train_args, archive, args.max_relaunches, args.keep)
        except RuntimeError as e:
            print(f"launch.tpu: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
