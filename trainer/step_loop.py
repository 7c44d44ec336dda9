"""The step loop: steps the state and does what each step is due (log, evaluate, checkpoint, export), finishing
each step on the host while the next one runs on the devices."""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from data import multihost
from storage import Path
from trainer import (consensus, export, goodput, metrics, nonfinite, pod, probes_in_loop, run_lock, run_metadata,
                     run_setup, state as state_lib)
from trainer.config import RunConfig

log = logging.getLogger(__name__)


class Preemption(Protocol):
    """Whether the run was asked to stop (SIGTERM), checked before every step."""
    requested: bool


@dataclasses.dataclass(frozen=True)
class Due:
    """What a step is due for. evaluate, save and export read the state after that step, so such a step is finished
    before the next one is dispatched."""
    evaluate: bool
    log: bool
    save: bool
    export: bool
    probe: bool = False

    @property
    def needs_state(self) -> bool:
        return self.evaluate or self.save or self.export or self.probe


class StepLoop:
    """Steps the state and does what each step is due: log, evaluate, checkpoint, export.

    Step k is dispatched, then step k-1 is finished on the host while step k runs: its metrics fetched, its loss
    checked, logged (TrainConfig.async_metrics; without it each step is finished before the next batch is taken).
    A step due to be evaluated, saved or exported is finished before the next dispatch, so nothing is ever saved
    from a step whose loss was not seen to be finite. Step time is wall time between finished steps.

    `config` is the effective run (init_from's network fields). Explicit state: `state` (the TrainState after `step`
    steps), `pending` (the dispatched step not yet finished, with its device metrics), `tokens_seen` (per component,
    exact over the global batch, up to the last finished step), `last_saved` (the step of the newest checkpoint
    this run wrote or resumed from), `last_rec` (the last metrics record), `eval_loss` (the last held-out losses).
    """

    def __init__(self, run: RunConfig, setup: run_setup.Setup, steps: run_setup.CompiledSteps,
                 state: state_lib.TrainState, tokens_seen: dict[str, int], tokenizer_dir: Path,
                 scorer: probes_in_loop.Scorer | None = None, clock: goodput.Clock | None = None):
        t = run.train
        self.spent = clock or goodput.Clock()  # where the wall time goes (trainer.goodput)
        self.config, self.setup, self.steps, self.tokenizer_dir = run, setup, steps, tokenizer_dir
        self.names = setup.pipe.component_names
        self.state, self.tokens_seen = state, tokens_seen
        self.step = self.start = int(state.step)
        pod.progress(self.start)
        self.pending: tuple[int, dict[str, jax.Array]] | None = None
        self.last_saved = self.start if setup.ckpt.latest_step() == self.start else None
        self.last_rec: dict[str, Any] = {}
        self.eval_loss: dict[str, float] = {}
        self.eval_tokens: dict[str, int] = {}
        peak, self.peak_source = metrics.peak_flops_per_device(t.hardware, t.peak_flops)
        self.peak_total = peak * setup.mesh.size
        self.flops_per_token = metrics.train_flops_per_token(run.model, t.seq_len)
        self.window = metrics.Window(self.names)
        # Records past the step resumed from are redone; a run starting at step 0 redoes step 0's probe record too.
        kept = self.start - 1 if scorer is not None and self.start == 0 else self.start
        self.sinks = metrics.Sinks(setup.model_dir, resume_step=kept, run_name=setup.model_dir.name,
                                   wandb_project=t.wandb_project)
        self.probes = None if scorer is None else probes_in_loop.InLoopProbes(
            scorer, every=t.probe_every, train_steps=t.train_steps, model_dir=setup.model_dir, kept=kept)
        self.bar = _progress(t, self.start)
        self.clock = time.perf_counter()

    def run(self, preemption: Preemption, lock: run_lock.RunLock | None = None) -> str:
        """Steps until train_steps, SIGTERM or the end of the data; returns why it stopped. Every dispatched step is
        finished (its loss checked) before this returns. Raises run_lock.LockLost (every process) at the first step
        boundary after `lock` (process 0's) was taken by another run; metrics not yet written are then dropped."""
        lost = False
        try:
            if self.probes is not None and self.start == 0:
                self.sinks.write({"step": 0, **self._probe()})  # the starting parameters
            self._export_resumed_step()
            self.clock = time.perf_counter()
            stopped = self._steps(preemption, lock)
            self._finish_pending()
            if self.probes is not None and stopped == "data_exhausted" and self.probes.last_scored != self.step:
                self.sinks.write({"step": self.step, **self._probe()})  # the end of the run
            return stopped
        except run_lock.LockLost:
            lost = True
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            with self.spent.phase("metrics"):
                self.sinks.close(discard=lost)

    def _export_resumed_step(self) -> None:
        """A run stopped after checkpoint k committed but before its export of step k was complete (killed while
        exporting) resumes at k: that export is made now, from the same parameters."""
        every = self.config.checkpoint.export_every
        if not (every and self.start and self.start % every == 0):
            return
        folder = self.setup.model_dir / "exports" / str(self.start)
        if not consensus.from_process_0(f"looking for the export {folder}",
                                        lambda: (folder / export.EXPORT_MARKER).exists()):
            log.info("exporting step %d, whose export the previous run did not finish", self.start)
            self.export(folder)

    def _steps(self, preemption: Preemption, lock: run_lock.RunLock | None) -> str:
        while self.step < self.config.train.train_steps:
            lost = lock.lost if lock is not None else None
            local, stop = self._next_batch_or_agreed_stop(preemption.requested, lost)
            if stop is not None:
                log.info("process %d of %d stops at step %d (%s)", jax.process_index(), jax.process_count(),
                         self.step, stop)
                return stop
            self._dispatch(local)
        return "done"

    def _next_batch_or_agreed_stop(self, preempted: bool, lock_lost: str | None = None
                                   ) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(this process's rows of the next batch, None), or (None, why every process stops before this step).

        Every process votes its local reasons (SIGTERM seen, data shard exhausted, component over its epoch cap)
        before the step and all act on the union (trainer.consensus), so no process enters the train step or a
        checkpoint save while another has left the loop. A process that fetched a batch for a step that is not taken
        rewinds its iterator, so the checkpoint holds every process's data position at the same step.
        """
        iterator = self.setup.pipe.iterator
        local, error, reasons = None, None, set()
        before = iterator.get_state() if jax.process_count() > 1 else None
        if lock_lost:
            reasons.add("lock_lost")
        elif preempted:
            reasons.add("preempted")
        else:
            try:
                with self.spent.phase("data_wait"):
                    local = next(iterator)
            except StopIteration:
                reasons.add("data_exhausted")
            except Exception as e:  # noqa: BLE001 - e.g. ComponentExhausted, a read error: all stop, then it is raised
                error = e
                reasons.add("data_error")
                pod.report_failure(e, f"reading its next batch for step {self.step + 1}")
        agreed = consensus.agree(reasons)
        if not agreed:
            return local, None
        if local is not None:
            iterator.set_state(before)
        if "lock_lost" in agreed:
            raise run_lock.LockLost(lock_lost or "process 0 lost MODEL_DIR's writer lock to another run (its log names "
                                    "it); this process stops too")
        if "data_error" in agreed:
            raise error or consensus.other_failed(f"reading its next batch for step {self.step + 1}")
        return None, "data_exhausted" if "data_exhausted" in agreed else "preempted"

    def _dispatch(self, local: dict[str, np.ndarray]) -> None:
        """Starts step `step + 1` on the devices, then finishes the previous step while it runs."""
        batch = multihost.global_batch(local, self.setup.mesh, self.steps.program.batch_spec)
        self.state, device_metrics = self.steps.train(self.state, batch)
        self.step += 1
        pod.progress(self.step)
        self._finish_pending()
        self.pending = (self.step, device_metrics)
        if not self.config.train.async_metrics or self._due(self.step).needs_state:
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Fetches the pending step's metrics (waiting for the step), checks its loss, counts it, and does what it is
        due for."""
        if self.pending is None:
            return
        step, device_metrics = self.pending
        self.pending = None
        m = jax.device_get(device_metrics)
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        self._check_finite(step, m)
        self.spent.step_finished(step)
        for name, n in zip(self.names, np.asarray(m["component_tokens"])):
            self.tokens_seen[name] += int(n)
        self.window.add(m, seconds)
        self._after_step(step, m)

    def _check_finite(self, step: int, m: dict[str, Any]) -> None:
        """Step `step`'s loss was computed from the parameters of step - 1: it decides whether their checkpoint is
        good (checkpoint_health)."""
        ckpt = self.setup.ckpt
        what = nonfinite.what(m)
        if what:
            raise nonfinite.NonFiniteLoss(nonfinite.message(step, m, what, ckpt, ckpt.mark_nonfinite(step - 1, what)),
                                          step)
        ckpt.mark_good(step - 1)

    def _due(self, step: int) -> Due:
        t, c = self.config.train, self.config.checkpoint
        last = step == t.train_steps
        evaluate = self.steps.eval is not None and (step % t.eval_every == 0 or last)
        probe = self.probes is not None and self.probes.due(step)
        log_step = step % t.log_every == 0 or last or evaluate or probe or step == self.start + 1
        return Due(evaluate=evaluate, log=log_step, save=step % c.every == 0,
                   export=bool(c.export_every) and step % c.export_every == 0, probe=probe)

    def _after_step(self, step: int, m: dict[str, Any]) -> None:
        """Evaluate, log, checkpoint and export as due at `step`."""
        due = self._due(step)
        if due.needs_state:
            assert step == self.step, f"step {step} is due for host work but the state is at step {self.step}"
        if due.evaluate:
            with self.spent.phase("evaluation"):
                self.eval_loss, self.eval_tokens = self._evaluate()
        if due.log:
            self._log(step, m, self.eval_loss if due.evaluate else {}, self._probe() if due.probe else {})
        if due.save:
            self.save()
        if due.export:
            self.export(self.setup.model_dir / "exports" / str(step))
        if due.needs_state:
            self.clock = time.perf_counter()  # evaluation and saving are not step time
        if self.bar is not None:
            self.bar.update(1)

    def _evaluate(self) -> tuple[dict[str, float], dict[str, int]]:
        """({component: mean held-out loss over the fixed eval batches}, {component: target tokens it is over})."""
        names = self.setup.eval_names
        loss, weight = np.zeros(len(names)), np.zeros(len(names))
        for b in self.setup.eval_batches:
            batch = multihost.global_batch(b, self.setup.mesh, self.steps.program.batch_spec)
            sums = jax.device_get(self.steps.eval(self.state.params, batch))
            loss += np.asarray(sums.per_component_loss)
            weight += np.asarray(sums.per_component_weight)
        return ({n: float(loss[i] / weight[i]) for i, n in enumerate(names) if weight[i] > 0},
                {n: int(weight[i]) for i, n in enumerate(names) if weight[i] > 0})

    def _probe(self) -> dict[str, float]:
        """The in-loop probes of the current parameters (trainer.probes_in_loop)."""
        with self.spent.phase("probes"), consensus.together(f"scoring the probe sets at step {self.step}"):
            return self.probes.score(self.step, self.state.params)  # (process 0 also writes)

    def _log(self, step: int, m: dict[str, Any], eval_loss: dict[str, float], probes: dict[str, float]) -> None:
        t = self.config.train
        rec = self.window.record(step, m, self.tokens_seen, t.batch_size * t.seq_len, self.flops_per_token,
                                 self.peak_total)
        rec.update({f"eval/loss/{k}": v for k, v in eval_loss.items()})
        rec.update(probes)
        self.sinks.write(rec)
        self.window.reset()
        self.last_rec = rec
        _show(self.bar, rec)

    def save(self) -> None:
        """Checkpoints the current state with the data position and tokens seen (once per step), after its step's
        loss was checked."""
        self._finish_pending()
        if self.last_saved == self.step or self.step == self.start:  # resumed from it, or nothing trained yet
            return
        with self.spent.phase("checkpoint_save"):
            self.sinks.flush()  # the metrics of the steps this checkpoint holds are stored before it commits
            self.setup.ckpt.save(self.state, self.setup.pipe.iterator,
                                 run_metadata.build(self.config.model, self.config.mixture, step=self.step,
                                                    tokens_seen=self.tokens_seen, optimizer=self.config.optimizer,
                                                    train_steps=self.config.train.train_steps,
                                                    data_fingerprint=self.setup.data_fingerprint))
            self.spent.write()  # this attempt's time so far survives a kill
        self.last_saved = self.step

    def export(self, out_dir: Path) -> Path:
        """Hugging Face export of the current parameters in CheckpointConfig.export_dtype."""
        model = nnx.merge(self.steps.program.graphdef, self.state.params)
        with self.spent.phase("export"), consensus.together(f"exporting {out_dir}"):  # gathered by all, written by process 0 alone
            return export.export(model, out_dir, dtype=self.config.checkpoint.export_dtype,
                                 tokenizer_dir=self.tokenizer_dir, overwrite=True,  # the run's own earlier export
                                 source=f"{self.setup.model_dir} step {self.step}")


def _progress(t, start: int):
    if not t.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=t.train_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=not sys.stderr.isatty())


def _show(bar, rec: dict[str, Any]) -> None:
    text = (f"step {rec['step']} loss {rec['loss']:.4f} lr {rec['lr']:.2e} grad_norm {rec['grad_norm']:.3f} "
            f"{rec['tokens_per_s']:,.0f} tok/s mfu {rec['mfu']:.1%}")
    if bar is not None and not bar.disable:
        bar.set_postfix_str(text.split(" ", 2)[2], refresh=False)
    else:
        log.info(text)
