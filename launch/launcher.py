"""Seeing one launch through on a Cloud TPU slice: create, set up, sync, start the job detached, follow it through
the state it writes under MODEL_DIR/launch/ and the VMs' state, relaunch after a preemption in any phase, and delete
the slice only when no job of it is alive. `launch.tpu` is its command line (and says what happens when)."""
from __future__ import annotations

import dataclasses
import pathlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import exit_codes
from launch import cloud, job, remote
from launch.cloud import READY, SSH_DROPPED, UNKNOWN, Gcloud, Slice


class CloudFailure(exit_codes.ServiceUnavailable):
    """A cloud command failed in a way no retry or relaunch fixes."""


class Preempted(Exception):
    def __init__(self, phase: str, node: str, state: str):
        super().__init__(f"{node} is {state or 'gone'} ({phase})")


@dataclasses.dataclass(frozen=True)
class Launch:
    launch_id: str
    workers: tuple[str, ...]       # the job's worker keys, NODE-wI


@dataclasses.dataclass(frozen=True)
class Ended:
    """Every worker's job wrote a final state."""
    states: dict[str, dict[str, Any]]

    @property
    def stopped(self) -> bool:
        return any(s["state"] == "stopped" for s in self.states.values())


@dataclasses.dataclass(frozen=True)
class Lost:
    """The heartbeat of these workers' jobs stopped (or never began) while their VMs stayed READY."""
    workers: tuple[str, ...]


@dataclasses.dataclass
class Options:
    max_relaunches: int = 10
    poll_s: float = 30.0            # between looks at the job's state and the VMs'
    heartbeat_s: float = 10.0       # the job's state and log writes
    stale_s: float = 900.0          # a heartbeat that has not grown for this long: the job is lost
    ssh_retries: int = 5
    stop_grace_s: float = 120.0
    ready_timeout_s: float = 86400.0  # waiting for a created (or queued) slice to become READY
    keep: bool = False


class Launcher:
    def __init__(self, s: Slice, gcloud: Gcloud, model_dir: str, train_args: Sequence[str], archive: pathlib.Path,
                 options: Options, out: Callable[[str], None] = print):
        self.slice, self.gcloud, self.model_dir, self.train_args = s, gcloud, model_dir, list(train_args)
        self.archive, self.o, self.out = archive, options, out
        self.launch: Launch | None = None
        self.log_after: dict[str, int] = {}

    def say(self, text: str) -> None:
        self.out(f"launch.tpu: {text}")

    # -- phases ------------------------------------------------------------------------------------------------
    def state_of(self, node: str) -> cloud.NodeState:
        """The node's state, asked again while gcloud cannot tell (UNKNOWN), up to `ssh_retries` times."""
        for attempt in range(self.o.ssh_retries + 1):
            st = self.gcloud.node_state(self.slice, node)
            if st.state != UNKNOWN:
                return st
            if attempt < self.o.ssh_retries:
                time.sleep(self.o.poll_s)
        return st

    def nodes_ready(self, phase: str) -> list[cloud.NodeState]:
        """The nodes' states; raises Preempted for one that is neither READY nor UNKNOWN (gcloud failing here says
        nothing about the VM: its job goes on)."""
        states = [self.state_of(n) for n in self.slice.nodes]
        for node, st in zip(self.slice.nodes, states):
            if st.state not in (READY, UNKNOWN):
                raise Preempted(phase, node, st.state)
        return states

    def on_nodes(self, phase: str, command: Callable[[str], list[str]]) -> None:
        """Runs command(node) for every node; an SSH drop with the node READY is retried, a node that is not READY
        is a preemption, anything else a CloudFailure."""
        for node in self.slice.nodes:
            for _ in range(self.o.ssh_retries + 1):
                rc, _ = self.gcloud.run(command(node))
                if rc == 0:
                    break
                state = self.state_of(node).state
                if state not in (READY, UNKNOWN):
                    raise Preempted(phase, node, state)
                if rc != SSH_DROPPED:
                    raise CloudFailure(f"{phase} on {node} failed with exit status {rc} (the VM is READY)")
                self.say(f"{phase}: the SSH connection to {node} dropped (exit 255; the VM is READY): retrying")
                time.sleep(self.o.poll_s)
            else:
                raise CloudFailure(f"{phase}: SSH to {node} failed {self.o.ssh_retries + 1} times")

    def create(self) -> None:
        if self.gcloud.dry_run:
            self.gcloud.run(cloud.create_command(self.slice))
            return
        states = [self.state_of(n).state for n in self.slice.nodes]
        if all(st == READY for st in states):
            self.say(f"{', '.join(self.slice.nodes)}: READY, reused")
            return
        if any(states):  # left over from a preemption: only dead nodes get here (jobs on READY ones were stopped)
            self.gcloud.run(cloud.delete_command(self.slice))
        rc, _ = self.gcloud.run(cloud.create_command(self.slice))
        deadline = time.monotonic() + self.o.ready_timeout_s
        while True:
            states = [self.state_of(n).state for n in self.slice.nodes]
            if all(st == READY for st in states):
                return
            queued = self.gcloud.queued_state(self.slice) if self.slice.is_queued else ""
            dead = [(n, st) for n, st in zip(self.slice.nodes, states) if st not in ("", "CREATING", READY, UNKNOWN)]
            if queued in ("FAILED", "SUSPENDED"):
                raise Preempted("create", self.slice.name, queued)
            if dead:
                raise Preempted("create", *dead[0])
            if rc != 0 and not self.slice.is_queued and not any(states):
                raise CloudFailure(f"creating {self.slice.name} failed with exit status {rc}")
            if time.monotonic() > deadline:
                raise CloudFailure(f"{self.slice.name} not READY after {self.o.ready_timeout_s:.0f} s")
            time.sleep(self.o.poll_s)

    def prepare(self) -> None:
        self.on_nodes("sync", lambda n: cloud.scp_command(self.slice, n, str(self.archive), remote.ARCHIVE))
        self.on_nodes("sync", lambda n: cloud.ssh_command(self.slice, n, remote.unpack_command()))
        self.on_nodes("setup", lambda n: cloud.ssh_command(self.slice, n, remote.setup_command()))

    def start(self) -> Launch:
        launch_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        dry = [cloud.NodeState(READY, 1)] * len(self.slice.nodes)
        states = dry if self.gcloud.dry_run else self.nodes_ready("start")
        if any(s.state == UNKNOWN for s in states):
            raise CloudFailure("gcloud cannot describe the slice (is the network down?); nothing was started")
        workers = [s.workers for s in states]
        self.launch = Launch(launch_id, tuple(f"{n}-w{i}" for n, w in zip(self.slice.nodes, workers) for i in range(w)))
        self.on_nodes("start", lambda n: cloud.ssh_command(self.slice, n, remote.start_command(
            self.model_dir, launch_id, n, self.train_args, self.o.heartbeat_s)))
        if not self.gcloud.dry_run:
            self.say(f"started job {launch_id} on {len(self.launch.workers)} worker(s); following "
                     f"{self.model_dir}/launch/")
        return self.launch

    # -- following a job ---------------------------------------------------------------------------------------
    def states(self, launch: Launch) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in job.read_states(self.model_dir).items() if v.get("launch_id") == launch.launch_id}

    def stream_logs(self, launch: Launch, worker: str | None = None) -> None:
        worker = worker or launch.workers[0]
        key = f"{launch.launch_id}/{worker}"
        for number, text in job.log_chunks(self.model_dir, worker, launch.launch_id, self.log_after.get(key, 0)):
            self.out(text.rstrip("\n"))
            self.log_after[key] = number

    def follow(self, launch: Launch) -> Ended | Lost:
        """Until every worker's job has ended (Ended), a node is not READY (raises Preempted), or a heartbeat stops
        growing for `stale_s` (Lost)."""
        grew = {w: (None, time.monotonic()) for w in launch.workers}  # worker -> (heartbeat, when it last changed)
        while True:
            states = self.states(launch)
            self.stream_logs(launch)
            now = time.monotonic()
            for w in launch.workers:
                beat = states.get(w, {}).get("heartbeat")
                if beat != grew[w][0]:
                    grew[w] = (beat, now)
            if any(st.state == UNKNOWN for st in self.nodes_ready("train")):
                self.say("gcloud cannot describe the slice (no network here?); following the job in MODEL_DIR")
            if all(states.get(w, {}).get("state") in job.FINAL_STATES for w in launch.workers):
                return Ended({w: states[w] for w in launch.workers})
            lost = tuple(w for w in launch.workers if states.get(w, {}).get("state") not in job.FINAL_STATES
                         and now - grew[w][1] > self.o.stale_s)
            if lost:
                return Lost(lost)
            time.sleep(self.o.poll_s)

    def live_launch(self) -> Launch | None:
        """A job of an earlier launch.tpu still running on READY nodes (its heartbeat grows), to reattach to."""
        running = {s["launch_id"] for s in job.read_states(self.model_dir).values() if s.get("state") == "running"}
        if not running or any(self.state_of(n).state != READY for n in self.slice.nodes):
            return None
        before = job.read_states(self.model_dir)
        deadline = time.monotonic() + 10 * max(s.get("heartbeat_s", self.o.heartbeat_s) for s in before.values())
        while time.monotonic() < deadline:  # alive: a heartbeat grows within 10 of its intervals
            time.sleep(min(self.o.poll_s, 1.0))
            after = job.read_states(self.model_dir)
            for launch_id in sorted(running):
                workers = tuple(sorted(k for k, s in after.items() if s.get("launch_id") == launch_id))
                if any(after[w].get("heartbeat") != before.get(w, {}).get("heartbeat") for w in workers):
                    return Launch(launch_id, workers)
        return None

    def stop_jobs(self, launch: Launch) -> None:
        """Stops the launch's jobs on the nodes that are (or may be) READY (train.py saves on SIGTERM), retrying a
        failed SSH command; raises when one will not stop (its VM is then kept)."""
        command = remote.stop_command(launch.launch_id, self.o.stop_grace_s)
        for node in self.slice.nodes:
            for _ in range(self.o.ssh_retries + 1):
                if self.state_of(node).state not in (READY, UNKNOWN):
                    break  # the VM is gone, and its job with it
                if self.gcloud.run(cloud.ssh_command(self.slice, node, command))[0] == 0:
                    break
                time.sleep(self.o.poll_s)
            else:
                raise CloudFailure(f"the job {launch.launch_id} on {node} could not be stopped; the VM is kept")

    def jobs_alive(self) -> bool:
        """Whether a worker of the current launch on a node that is (or may be) READY has not written a final
        state."""
        if self.launch is None or self.gcloud.dry_run:
            return False
        try:
            states = self.states(self.launch)
        except OSError:  # the bucket cannot be read from here: the job may well be running
            return True
        ready = {n for n in self.slice.nodes if self.state_of(n).state in (READY, UNKNOWN)}
        return any(states.get(w, {}).get("state") not in job.FINAL_STATES and w.rsplit("-w", 1)[0] in ready
                   for w in self.launch.workers)

    # -- the whole run -----------------------------------------------------------------------------------------
    def run(self) -> int:
        relaunches = 0
        try:
            launch = None if self.gcloud.dry_run else self.live_launch()
            if launch is not None:
                self.launch = launch
                self.say(f"job {launch.launch_id} is running on {self.slice.name}: reattached")
            while True:
                try:
                    if launch is None:
                        self.create()
                        self.prepare()
                        launch = self.start()
                    if self.gcloud.dry_run:
                        return 0
                    outcome = self.follow(launch)
                except Preempted as e:
                    outcome = e
                if isinstance(outcome, Ended) and not outcome.stopped:
                    return self.result(outcome)
                why = (f"preempted: {outcome}" if isinstance(outcome, Preempted) else
                       f"the job was stopped (SIGTERM) at step {_step(outcome)}" if isinstance(outcome, Ended) else
                       f"no heartbeat from {', '.join(outcome.workers)} for {self.o.stale_s:.0f} s")
                relaunches += 1
                if relaunches > self.o.max_relaunches:
                    raise CloudFailure(f"{why}; no relaunches left (--max_relaunches={self.o.max_relaunches})")
                self.say(f"{why}: relaunch {relaunches} of {self.o.max_relaunches}, resuming from {self.model_dir}")
                if launch is not None and not isinstance(outcome, Ended):
                    self.stop_jobs(launch)
                launch = None
        finally:
            self.finish()

    def result(self, ended: Ended) -> int:
        failed = [(w, s) for w, s in ended.states.items() if s.get("exit_code")]
        for worker, state in failed:
            streamed = worker == self.launch.workers[0]
            self.say(f"train.py on {worker} exited with status {state['exit_code']}"
                     + (" (its output is above)" if streamed else "; its output:"))
            if not streamed:
                self.stream_logs(self.launch, worker)
        code = failed[0][1]["exit_code"] if failed else 0
        self.say(f"job {self.launch.launch_id} finished at step {_step(ended)}: exit status {code}")
        return code if code in (0, 1, 2, 3, 4, 130) else exit_codes.INTERNAL

    def finish(self) -> None:
        if self.jobs_alive():
            delete = " ".join(cloud.delete_command(self.slice))
            self.say(f"the job {self.launch.launch_id} is still running on {self.slice.name}: the VM is kept. Rerun "
                     f"the same command to follow it again; to delete the VM: {delete}")
        elif self.o.keep:
            self.say(f"--keep: {self.slice.name} is kept")
        else:
            self.gcloud.run(cloud.delete_command(self.slice))
        if self.gcloud.dry_run:
            self.say("dry run: nothing was created and nothing ran")


def _step(ended: Ended) -> Any:
    steps = [s.get("step") for s in ended.states.values() if s.get("step") is not None]
    return max(steps) if steps else "?"

