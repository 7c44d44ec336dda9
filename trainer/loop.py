"""The training loop, in phases: set up (mesh, data, checkpointer) -> initial state (resume / init_from / scratch)
-> compile (these three in trainer.run_setup) -> step loop (step, log, evaluate, checkpoint, export) -> finish
(final save and export, summary).

`train(run)` is what train.py runs. It holds MODEL_DIR's writer lock (trainer.run_lock) while it runs (a run whose
lock another run took stops at the next step boundary with run_lock.LockLost, writing nothing more), stops cleanly
on SIGTERM (saves, returns `stopped="preempted"`), refuses to continue on a non-finite loss (raises
nonfinite.NonFiniteLoss before anything is saved from that step), and resumes from the newest resumable checkpoint
in MODEL_DIR automatically (trainer.checkpoint_health: checkpoints known to give a non-finite loss, or damaged, are
set aside). The step loop itself is trainer.step_loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
from typing import Any

import jax

from storage import Path
from trainer import (consensus, goodput, nonfinite, pod, preemption, probes_in_loop, program as program_lib, run_dir,
                     run_lock, run_setup, step_loop)
from trainer.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Summary:
    model_dir: Path
    step: int
    stopped: str                     # "done", "preempted" (SIGTERM) or "data_exhausted"
    loss: float | None
    component_loss: dict[str, float | None]
    eval_loss: dict[str, float]
    eval_tokens: dict[str, int]      # target tokens behind each held-out loss
    tokens_per_s: float
    mfu: float
    peak_source: str
    checkpoint: Path | None
    export: Path | None
    goodput: dict[str, Any] | None = None  # MODEL_DIR/goodput.json as written at the end (process 0; trainer.goodput)


def train(run: RunConfig, *, probe_scorer: probes_in_loop.ScorerFactory | None = None,
          clock: goodput.Clock | None = None) -> Summary:
    """Runs (or resumes) `run` to TrainConfig.train_steps, SIGTERM, or the end of the data. `probe_scorer` scores
    TrainConfig.probe_sets (train.py passes eval.live_probes.ProbeSets.scorer; trainer.probes_in_loop). `clock`
    (train.py's, started with the process) accounts for the wall time in MODEL_DIR/goodput.json."""
    clock = clock or goodput.Clock()
    with _writer_lock(run.train.model_dir) as lock:
        setup = run_setup.Setup.create(run)
        try:
            run = run_setup.effective_run(setup)
            program = program_lib.build(run, setup.mesh, len(setup.pipe.component_names))
            scorer = _probe_scorer(run, setup, program, probe_scorer)
            with clock.phase("restore") as phase:
                state, tokens_seen = run_setup.initial_state(setup, run, program)
                if int(state.step) == 0:  # initialised from scratch or INIT_FROM: start-up
                    phase.name = "startup"
            tokenizer_dir = run_setup.write_run_files(run, setup.model_dir)
            with clock.phase("compile"):
                steps = run_setup.compile_steps(program, state, run, len(setup.eval_names))
            clock.open(setup.model_dir, int(state.step), setup.logged_step, writes=jax.process_index() == 0)
            loop = step_loop.StepLoop(run, setup, steps, state, tokens_seen, tokenizer_dir, scorer, clock)
            clock.started()
            with _Preemption() as preemption, jax.set_mesh(setup.mesh):
                with clock.phase("productive"):
                    stopped = loop.run(preemption, lock)
                summary = finish(loop, stopped)
        except nonfinite.NonFiniteLoss as e:  # the rerun truncates metrics.jsonl: this attempt's records are kept apart
            kept = run_dir.set_aside_metrics(setup.model_dir, e.step, str(e)) if jax.process_index() == 0 else None
            if kept is None:
                raise
            raise nonfinite.NonFiniteLoss(f"{e} This attempt's metrics are kept in {kept}.", e.step) from None
        finally:
            with clock.phase("checkpoint_save"):
                setup.ckpt.close()  # waits for in-flight async saves (good checkpoints) even when stopping on an error
            setup.pipe.iterator.close()  # stops the prefetch thread
        return dataclasses.replace(summary, goodput=clock.write(stopped))


def _probe_scorer(run: RunConfig, setup: run_setup.Setup, program: program_lib.Program,
                  factory: probes_in_loop.ScorerFactory | None) -> probes_in_loop.Scorer | None:
    """The scorer of TrainConfig.probe_sets, built (its sets read and encoded) before the parameters are loaded."""
    if not run.train.probe_sets:
        return None
    if factory is None:
        raise ValueError("TrainConfig.probe_sets is set but no probe scorer was given to trainer.loop.train "
                         "(train.py gives eval.live_probes.ProbeSets.scorer)")
    with consensus.together("reading its probe sets"):
        return factory(run, setup.mesh, program.graphdef)


@contextlib.contextmanager
def _writer_lock(model_dir: str):
    """MODEL_DIR's writer lock, taken by process 0 before any work and yielded (None on the other processes); every
    process stops when it cannot be taken (run_lock.RunLocked on process 0, OtherProcessFailed naming it on the
    others). Released on any exit, also when trainer.pod ends the process."""
    lock = None
    with consensus.together("taking MODEL_DIR's writer lock"):
        if jax.process_index() == 0:
            run_dir.check(model_dir)  # someone else's folder is refused before anything is written into it
            Path(model_dir).mkdir(parents=True, exist_ok=True)
            lock = run_lock.RunLock(model_dir)
            lock.acquire()
            try:
                run_dir.claim(model_dir)  # a docmix run directory from here on
            except BaseException:
                lock.release()
                raise
    if lock is None:
        yield None
        return
    forget = pod.on_abort(lock.release)
    try:
        yield lock
    finally:
        forget()
        lock.release()


# --- phase 5: finish ----------------------------------------------------------------------------------------------

def finish(loop: step_loop.StepLoop, stopped: str) -> Summary:
    """Saves the final state (any stop), exports it when the run is done, and summarises."""
    loop.save()
    export_dir = None
    if stopped == "done" and loop.config.checkpoint.export_at_end:
        export_dir = loop.export(loop.setup.model_dir / "hf")
    rec = loop.last_rec
    ckpt_dir = loop.setup.ckpt.directory
    return Summary(model_dir=loop.setup.model_dir, step=loop.step, stopped=stopped, loss=rec.get("loss"),
                   component_loss={n: rec.get(f"loss/{n}") for n in loop.names}, eval_loss=loop.eval_loss,
                   eval_tokens=loop.eval_tokens,
                   tokens_per_s=rec.get("tokens_per_s", 0.0), mfu=rec.get("mfu", 0.0), peak_source=loop.peak_source,
                   checkpoint=ckpt_dir / str(loop.last_saved) if loop.last_saved is not None else None,
                   export=export_dir)


class _Preemption:
    """SIGTERM as trainer.preemption's flag, checked between steps. train.py installs its handler when the process
    starts; a caller that did not (a test calling `train`) gets it for the loop only."""

    def __init__(self):
        self._previous = None

    def __enter__(self):
        self._previous = preemption.install()
        return self

    @property
    def requested(self) -> bool:
        return preemption.requested()

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
