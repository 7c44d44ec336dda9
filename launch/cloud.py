"""Cloud TPU slices through the `gcloud` command line: the slice spec, every gcloud command as an argument list, and
the runner that executes them (no shell) and reads a node's state.

One slice is a TPU VM ("node", `gcloud compute tpus tpu-vm create`), or a queued resource that waits for capacity
(`--queued`). Several slices (`num_slices` > 1, joined over the data-centre network) are always one queued resource
with that many nodes, named `NAME-0` ... `NAME-<n-1>`; each node has one or more workers (hosts).
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
from collections.abc import Callable, Sequence

import exit_codes

RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
READY = "READY"
UNKNOWN = "UNKNOWN"  # describe failed without saying the node is gone
SSH_DROPPED = 255   # what `gcloud ... ssh` returns when the connection fails or drops


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
    num_slices: int = 1

    @property
    def is_queued(self) -> bool:
        return self.queued or self.num_slices > 1

    @property
    def nodes(self) -> list[str]:
        return [self.name] if self.num_slices == 1 else [f"{self.name}-{i}" for i in range(self.num_slices)]

    def where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def default_runtime(accelerator_type: str) -> str:
    family = accelerator_type.split("-")[0]
    if family not in RUNTIMES:
        raise ValueError(f"--accelerator_type {accelerator_type!r}: no default --runtime_version for {family!r} "
                         f"(known: {', '.join(RUNTIMES)}); pass --runtime_version")
    return RUNTIMES[family]


def create_command(s: Slice) -> list[str]:
    capacity = ["--spot"] if s.spot else ["--reserved"] if s.reserved else []
    if s.is_queued:
        nodes = [f"--node-id={s.name}"] if s.num_slices == 1 else [f"--node-count={s.num_slices}",
                                                                  f"--node-prefix={s.name}"]
        return ["gcloud", "compute", "tpus", "queued-resources", "create", s.name, *nodes,
                f"--accelerator-type={s.accelerator_type}", f"--runtime-version={s.runtime_version}",
                *capacity, *s.where()]
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", s.name, f"--accelerator-type={s.accelerator_type}",
            f"--version={s.runtime_version}", *capacity, *s.where()]


def queued_state_command(s: Slice) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", s.name, *s.where(),
            "--format=value(state.state)"]


def describe_command(s: Slice, node: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", node, *s.where(), "--format=json"]


def delete_command(s: Slice) -> list[str]:
    if s.is_queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", s.name, *s.where(), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s.where(), "--quiet"]


def ssh_command(s: Slice, node: str, remote_command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *s.where(), f"--worker={worker}",
            f"--command={remote_command}"]


def scp_command(s: Slice, node: str, local: str, remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}", *s.where(), "--worker=all"]


@dataclasses.dataclass(frozen=True)
class NodeState:
    state: str          # READY, CREATING, PREEMPTED, ...; "" when the node does not exist
    workers: int        # hosts of the node (its network endpoints)


@dataclasses.dataclass
class Gcloud:
    """Runs gcloud commands: `program` replaces the leading `gcloud` (launch.local_cloud in a rehearsal); with
    `dry_run` each command is printed and none is run."""
    program: Sequence[str] = ("gcloud",)
    dry_run: bool = False
    out: Callable[[str], None] = print
    env: dict[str, str] | None = None     # the commands' environment (None: this process's)

    def run(self, command: list[str], capture: bool = False, quiet: bool = False) -> tuple[int, str]:
        """(exit status, stdout when `capture`; with `capture`, stderr follows stdout after a NUL)."""
        if self.dry_run:
            self.out("(dry run, not run) " + shlex.join(command))
            return 0, ""
        if not quiet:
            self.out("+ " + shlex.join(command))
        try:
            done = subprocess.run([*self.program, *command[1:]], capture_output=capture, text=True, env=self.env)
        except FileNotFoundError:
            raise exit_codes.ServiceUnavailable(f"{self.program[0]}: not found; install the Google Cloud CLI "
                                                "(https://cloud.google.com/sdk/docs/install)") from None
        return done.returncode, f"{done.stdout.strip()}\0{done.stderr.strip()}" if capture else ""

    def node_state(self, s: Slice, node: str) -> NodeState:
        """The node's state: "" once it is gone (describe says NOT_FOUND), UNKNOWN when describe fails otherwise
        (no network here, say: the node and its job may well be fine)."""
        rc, text = self.run(describe_command(s, node), capture=True, quiet=True)
        out, _, err = text.partition("\0")
        if rc != 0:
            return NodeState("" if "NOT_FOUND" in err else UNKNOWN, 0)
        info = json.loads(out)
        return NodeState(info.get("state", ""), max(len(info.get("networkEndpoints") or []), 1))

    def queued_state(self, s: Slice) -> str:
        rc, text = self.run(queued_state_command(s), capture=True, quiet=True)
        return text.partition("\0")[0] if rc == 0 else ""
