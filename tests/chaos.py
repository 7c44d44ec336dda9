"""A chaos soak of train.py: a tiny run killed at random moments and relaunched until it ends, checked every time.

    python -m tests.chaos --kills 200 --seconds 14400 --out DIR --json soak.json

A soak run trains the tiny model for STEPS steps (a checkpoint every 2 steps, a float32 export every 4 and at the end)
as one process or as two processes joined by jax.distributed (tests/multiproc.py), and kills it up to MAX_KILLS times:
SIGKILL or SIGTERM, to one process of two or to all, at a moment drawn from start-up, steps, checkpoint writes and
exports (not SIGKILL of process 0 alone: its coordination service goes with it, and JAX aborts the other process,
exit 134, as docs/training.md says). The soak watches MODEL_DIR and signals when the moment is on disk (an Orbax temporary folder, an export's
temporary folder, a new metrics record); the moment recorded is the one seen at the signal. Then it relaunches the
same command until the run ends, and checks:
- every launch: each exit code is on the table (exit_codes.py) and not 4, and a non-zero code ends the process's
  stderr with one line `train.py: error: ...`; after a kill only 0 (SIGTERM: saved, all stopped together) or 3 (the
  peer was lost); a launch that was not killed exits 0 everywhere, so a relaunch is never refused (no lock or
  half-written file of a killed launch blocks it);
- no process outlives a kill of its peer by more than --failure_timeout plus SLACK_S;
- the user's files (beside MODEL_DIR, inside it and beside its export folders) are unchanged after every launch;
- at the end: every logged loss and gradient norm, and the final and periodic exports, equal an uninterrupted run's
  of the same process count bit for bit, and no writer lock is left. Temporary folders that killed checkpoint saves
  and exports left are counted (`temporary_folders_left`), not failed on.
Every wait has a deadline; every process is SIGKILLed when its launch is over (tests/multiproc.Cluster).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import sys
import time
from typing import Any

from tests import chaos_disk, multiproc
from trainer.run_dir import MARKER

STEPS = 10
ARGS = ["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=16", "--gin.SEQ_LEN=32",
        f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_EVERY=2", "--gin.TrainConfig.log_every=1",
        "--gin.TrainConfig.eval_every=None", "--gin.TrainConfig.peak_flops=1e12",
        "--gin.OptimizerConfig.warmup_steps=2", "--gin.CheckpointConfig.export_every=4",
        "--gin.CheckpointConfig.export_dtype='float32'", "--gin.TrainConfig.progress_bar=False"]
EXPORTS = ("exports/4", "exports/8", "hf")
TABLE = {0, 1, 2, 3, 4, 130}   # exit_codes.py
FAILURE_TIMEOUT = 20           # --failure_timeout of the 2-process runs
SLACK_S = 10                   # a loaded machine's scheduling on top of the bound
LAUNCH_TIMEOUT = 600           # a launch that runs longer than this is a hang
MAX_KILLS = 4                  # kills per soak run; then it is relaunched until it ends
MOMENTS = ("start-up", "steps", "checkpoint", "export")


@dataclasses.dataclass
class Kill:
    processes: int
    signal: str           # SIGKILL | SIGTERM
    target: str           # all | process 0 | process 1
    wanted: str           # the moment drawn
    moment: str           # the moment seen when the signal was sent
    codes: list[int]      # exit codes of the launch (-9: killed by the soak)
    outlived_s: float     # from the signal to the last process's exit


@dataclasses.dataclass
class Report:
    runs: int = 0
    exact: int = 0
    kills: list[Kill] = dataclasses.field(default_factory=list)
    launches: int = 0
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)
    leftovers: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        by = collections.Counter
        kills = self.kills
        peer = [k.outlived_s for k in kills if k.target != "all" and k.signal == "SIGKILL"]
        return {"runs": self.runs, "bit_exact_finishes": self.exact, "launches": self.launches, "kills": len(kills),
                "kills_by_signal_and_target": dict(by(f"{k.processes}p {k.signal} {k.target}" for k in kills)),
                "kills_by_moment": dict(by(k.moment for k in kills)),
                "longest_peer_outliving_s": round(max(peer, default=0.0), 1),
                "longest_exit_after_a_signal_s": round(max((k.outlived_s for k in kills), default=0.0), 1),
                "exit_codes_seen": {str(c): n for c, n in sorted(self.codes.items())},
                "temporary_folders_left": self.leftovers, "problems": self.problems, "seconds": round(self.seconds)}


def command_args(model_dir: pathlib.Path, processes: int) -> list[str]:
    extra = [f"--failure_timeout={FAILURE_TIMEOUT}"] if processes > 1 else []
    return [*ARGS, f"--gin.MODEL_DIR={model_dir}", *extra]


def devices(processes: int) -> int:
    return 2 // processes  # the same 2-device mesh either way


def reference(out: pathlib.Path, processes: int) -> pathlib.Path:
    """An uninterrupted run of `processes` processes (made once per output folder)."""
    model_dir = out / f"reference_{processes}p" / "run"
    if not (model_dir / "hf" / "config.json").is_file():
        shutil.rmtree(model_dir.parent, ignore_errors=True)
        multiproc.run(processes, devices(processes), command_args(model_dir, processes), model_dir.parent / "logs",
                      LAUNCH_TIMEOUT)
    return model_dir


class Launch:
    """One launch of the run's command; `watch_and_kill` signals it at a moment, `finish` waits for every process."""

    def __init__(self, model_dir: pathlib.Path, processes: int, log_dir: pathlib.Path):
        self.model_dir, self.processes = model_dir, processes
        self.cluster = multiproc.Cluster(processes, devices(processes), command_args(model_dir, processes), log_dir)
        self.started = 0.0
        self.signalled: dict[int, int] = {}

    def __enter__(self) -> "Launch":
        self.cluster.__enter__()
        self.started = time.time()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.__exit__(*exc)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.cluster.procs)

    def wait_for(self, wanted: str, rng: random.Random, startup_s: float, first: bool = False) -> str | None:
        """Polls until `wanted` is on disk; the moment seen, or None when the launch ended first. Start-up: from the
        writer lock (train.py has parsed its configuration) a random time up to `startup_s`/2 (at once when `first`),
        or the first metrics record if that comes sooner (a launch after the first compiles from JAX's cache)."""
        if wanted == "start-up":
            deadline = time.time() + LAUNCH_TIMEOUT
            while time.time() < deadline and self.running() and not (self.model_dir / "writer.lock").exists():
                time.sleep(0.01)
            deadline = time.time() + (0.0 if first else rng.uniform(0, startup_s / 2))
            while time.time() < deadline and self.running() and \
                    chaos_disk.moment_on_disk(self.model_dir, self.started) == "start-up":
                time.sleep(0.01)
            return chaos_disk.moment_on_disk(self.model_dir, self.started) if self.running() else None
        target = min(chaos_disk.logged_step(self.model_dir) + rng.randint(1, 3), STEPS - 1)
        deadline = time.time() + LAUNCH_TIMEOUT
        while time.time() < deadline and self.running():
            seen = chaos_disk.moment_on_disk(self.model_dir, self.started)
            if seen == wanted and (wanted != "steps" or chaos_disk.logged_step(self.model_dir) >= target):
                return seen
            time.sleep(0.003)
        return None

    def signal(self, sig: int, which: list[int]) -> float:
        """Sends `sig` to the process groups of the processes `which`; when it was sent."""
        self.cluster.kill(sig, which)
        for i in which:
            self.signalled[i] = sig
        return time.monotonic()

    def finish(self) -> tuple[list[int], float]:
        """(exit codes, when the last process ended); a launch running past LAUNCH_TIMEOUT fails the soak."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while self.running():
            if time.monotonic() > deadline:
                raise AssertionError(self.cluster.report(f"a launch still ran after {LAUNCH_TIMEOUT}s (killed)"))
            time.sleep(0.01)
        return [p.returncode for p in self.cluster.procs], time.monotonic()


def check_codes(launch: Launch, codes: list[int], killed: bool) -> list[str]:
    """Problems with a launch's exit codes and last lines. After a kill a process ends with 0 (SIGTERM: saved, all
    stopped together) or 3 (its peer was lost); any other code is a problem, even one on the table."""
    problems = []
    for i, code in enumerate(codes):
        if launch.signalled.get(i) == signal.SIGKILL and code == -signal.SIGKILL:
            continue
        last = (launch.cluster.stderr(i).strip().splitlines() or [""])[-1]
        if code not in TABLE or code == 4:
            problems.append(f"process {i} exited {code} (off the table or a bug): {last[:300]}")
        elif code and not last.startswith("train.py: error: "):
            problems.append(f"process {i} exited {code} without a one-line error: {last[:300]}")
        elif code and not killed:
            problems.append(f"process {i} of a launch that was not killed exited {code}: {last[:300]}")
        elif code not in (0, 3):
            problems.append(f"process {i} exited {code} after a kill: {last[:300]}")
    return problems


def compare(got: pathlib.Path, want: pathlib.Path) -> list[str]:
    """Differences between a finished run and the reference: logged losses (bit for bit), exports (byte for byte)."""
    a, b = multiproc.metrics(got), multiproc.metrics(want)
    problems = []
    if [r["step"] for r in a] != list(range(1, STEPS + 1)):
        problems.append(f"logged steps {[r['step'] for r in a]}")
    got_losses, want_losses = chaos_disk.logged_losses(a), chaos_disk.logged_losses(b)
    if got_losses != want_losses:
        first = next((i for i, (x, y) in enumerate(zip(got_losses, want_losses)) if x != y), 0)
        problems.append(f"losses differ from the uninterrupted run's from record {first + 1}")
    for name in EXPORTS:
        for f in ("model.safetensors", "config.json"):
            x, y = got / name / f, want / name / f
            if not x.is_file() or x.read_bytes() != y.read_bytes():
                problems.append(f"{name}/{f} differs from the uninterrupted run's")
    if (got / "writer.lock").exists():
        problems.append("writer.lock left after the run ended")
    return problems


@dataclasses.dataclass(frozen=True)
class Spec:
    """A kill to make: at `moment`, `signal` to the process groups of the processes `which`."""
    moment: str
    signal: int
    which: tuple[int, ...]


# The first kills of every soak, per process count: SIGTERM before the first step (the run stops there, exit 0);
# SIGKILL while a checkpoint and while an export is written (the export is made when the run resumes at its step);
# SIGTERM to one process of two during start-up (both stop at the first step); SIGKILL of process 1 (process 0 finds
# it lost and exits 3).
PLAN = {1: [Spec("start-up", signal.SIGTERM, (0,)), Spec("checkpoint", signal.SIGKILL, (0,)),
            Spec("export", signal.SIGKILL, (0,))],
        2: [Spec("start-up", signal.SIGTERM, (1,)), Spec("steps", signal.SIGKILL, (1,))]}


def draw(rng: random.Random, processes: int) -> Spec:
    """A random kill: SIGKILL or SIGTERM to all processes or to one, at a random moment; never SIGKILL to process 0
    alone of several (JAX aborts the others then, exit 134: docs/training.md)."""
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    if processes == 1 or rng.random() < 1 / 3:
        which = tuple(range(processes))
    else:
        which = (rng.randrange(1 if sig == signal.SIGKILL else 0, processes),)
    return Spec(rng.choice(MOMENTS), sig, which)


def soak_run(out: pathlib.Path, index: int, processes: int, rng: random.Random, kills: int, report: Report,
             startup_s: float, planned: list[Spec], log=lambda line: None) -> None:
    """One run, killed `kills` times (the `planned` kills first, then drawn ones), relaunched until it ends."""
    run_dir = out / f"run{index:04d}_{processes}p"
    model_dir = run_dir / "model_dir"
    run_dir.mkdir(parents=True)
    user = {"../notes.txt": rng.randbytes(64)}
    (model_dir.parent / "notes.txt").write_bytes(user["../notes.txt"])
    for launch_no in range(kills + 20):
        first = bool(planned) and launch_no < kills
        spec = (planned.pop(0) if planned else draw(rng, processes)) if launch_no < kills else None
        with Launch(model_dir, processes, run_dir / f"launch{launch_no}") as launch:
            report.launches += 1
            seen = launch.wait_for(spec.moment, rng, startup_s, first) if spec else None
            sent = launch.signal(spec.signal, list(spec.which)) if seen else 0.0
            codes, ended = launch.finish()
            report.codes.update(c for i, c in enumerate(codes) if launch.signalled.get(i) != signal.SIGKILL)
            problems = check_codes(launch, codes, killed=seen is not None)
            if seen is not None:
                target = "all" if len(spec.which) == processes else f"process {spec.which[0]}"
                kill = Kill(processes, signal.Signals(spec.signal).name, target, spec.moment, seen, codes,
                            ended - sent)
                report.kills.append(kill)
                # A process killed before its peer joined: the peer waits --failure_timeout from its own join.
                bound = FAILURE_TIMEOUT + SLACK_S + (startup_s if seen == "start-up" else 0)
                if target != "all" and spec.signal == signal.SIGKILL and kill.outlived_s > bound:
                    problems.append(f"{kill}: a process outlived the kill of its peer by {kill.outlived_s:.0f}s "
                                    f"(bound {bound}s)")
        if len(user) == 1 and (model_dir / MARKER).exists():  # a run directory now: the user adds files to it
            user.update(chaos_disk.write_user_files(model_dir, rng))
        gone = chaos_disk.missing_user_files(model_dir, user)
        if gone:
            problems.append(f"user files changed or gone: {gone}")
        for p in problems:
            report.problems.append(f"{run_dir.name} launch {launch_no}: {p}")
            log(f"problem: {report.problems[-1]}")
        if problems:
            return
        if seen is None and all(c == 0 for c in codes) and (model_dir / "hf" / "config.json").is_file() \
                and chaos_disk.logged_step(model_dir) == STEPS:
            break
    else:
        report.problems.append(f"{run_dir.name}: did not finish after {kills + 20} launches")
        return
    report.runs += 1
    report.leftovers += len(chaos_disk.leftovers(model_dir))
    differences = compare(model_dir, out / f"reference_{processes}p" / "run")
    report.problems += [f"{run_dir.name}: {d}" for d in differences]
    for d in differences:
        log(f"problem: {run_dir.name}: {d}")
    report.exact += not differences
    if not any(name.startswith(run_dir.name) for name in report.problems):
        shutil.rmtree(run_dir)  # keep the folders of runs with problems only


def soak(out: pathlib.Path, kills: int, seconds: float, seed: int, processes: tuple[int, ...] = (1, 2),
         log=lambda line: None) -> Report:
    """Soak runs until `kills` kills were made or `seconds` passed (the run in progress is finished; one run of
    each process count at least). The first kills are PLAN's, so a short soak covers them."""
    start = time.monotonic()
    rng = random.Random(seed)
    report = Report()
    startup = {}
    for p in processes:
        startup[p] = chaos_disk.startup_seconds(reference(out, p))
        log(f"reference run of {p} process(es) ready; start-up {startup[p]:.0f}s")
    planned = {p: list(PLAN.get(p, ())) for p in processes}
    index = 0
    while len(report.kills) < kills and time.monotonic() - start < seconds or index < len(processes):
        p = processes[index % len(processes)]
        before = len(report.kills)
        left = max(1, kills - len(report.kills))
        n = max(rng.randint(1, min(MAX_KILLS, left)), min(len(planned[p]), MAX_KILLS, left))
        soak_run(out, index, p, rng, n, report, startup[p], planned[p], log)
        index += 1
        log(f"run {index} ({p} process(es)): {len(report.kills) - before} kills, total {len(report.kills)}, "
            f"{report.exact}/{report.runs} bit-exact, {len(report.problems)} problems, "
            f"{time.monotonic() - start:.0f}s")
    report.seconds = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="stop after this many kills (default 20)")
    parser.add_argument("--seconds", type=float, default=3600, help="stop starting runs after this many seconds")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument("--processes", default="1,2", help="process counts of the runs, taken in turn (default 1,2)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="working folder (reference runs are reused)")
    parser.add_argument("--json", type=pathlib.Path, help="write the summary here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed}", file=sys.stderr, flush=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(str(args.out), "jax_cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    report = soak(args.out, args.kills, args.seconds, seed, tuple(int(p) for p in args.processes.split(",")),
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    summary = {"seed": seed, **report.summary()}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
