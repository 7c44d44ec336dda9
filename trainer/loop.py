"""The training loop: build mesh, data and state (resume / init_from / scratch), compile, step, log, checkpoint, export.

`train(run)` is what train.py runs. It stops cleanly on SIGTERM (saves, returns `stopped="preempted"`), refuses to
continue on a non-finite loss (raises NonFiniteLoss before anything is saved from that step), and resumes from the
latest checkpoint in MODEL_DIR automatically.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from data import multihost, pipeline as data_pipeline
from data.tokenize import check_vocab
from models import sharding
from trainer import (checkpoint, export, initialize, metrics, optimizer, program as program_lib, run_metadata,
                     state as state_lib, step as step_lib)
from trainer.config import RunConfig, write_operative_config

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving that state."""


@dataclasses.dataclass(frozen=True)
class Summary:
    model_dir: pathlib.Path
    step: int
    stopped: str                     # "done", "preempted" (SIGTERM) or "data_exhausted"
    loss: float | None
    component_loss: dict[str, float | None]
    eval_loss: dict[str, float]
    tokens_per_s: float
    mfu: float
    peak_source: str
    checkpoint: pathlib.Path | None
    export: pathlib.Path | None


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (installed only in the main thread)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _eval_batches(run: RunConfig) -> tuple[tuple[str, ...], list[dict[str, np.ndarray]]]:
    """(component names, the fixed held-out batches) of the eval mixture; none without one."""
    if run.eval_mixture is None or not run.train.eval_every:
        return (), []
    pipe = data_pipeline.build(run.eval_mixture, process_index=jax.process_index(),
                               process_count=jax.process_count())
    return pipe.component_names, [next(pipe.iterator) for _ in range(run.train.eval_batches)]


def _initial_state(run: RunConfig, tx, mesh, ckpt: checkpoint.Checkpointer, iterator, names):
    """(state, run, tokens_seen): resumed from MODEL_DIR, loaded from init_from, or initialised from scratch."""
    tokens_seen = {n: 0 for n in names}
    latest = ckpt.latest_step()
    if latest is not None:
        saved = ckpt.metadata(latest)
        run_metadata.check(saved, run_metadata.build(run.model, run.mixture, step=0, tokens_seen=tokens_seen),
                           f"{ckpt.directory}/{latest}")
        log.info("resuming from %s/%d", ckpt.directory, latest)
        state = ckpt.restore(latest, state_lib.abstract(run.model, tx), mesh, iterator)
        return state, run, {n: int(saved["tokens_seen"].get(n, 0)) for n in names}
    if run.train.init_from:
        params, model_config = initialize.load_params(run.train.init_from, run.model, mesh)
        run = dataclasses.replace(run, model=model_config)
        ckpt.model_config = model_config
        log.info("initialised from %s", run.train.init_from)
        return state_lib.from_params(model_config, tx, params, mesh), run, tokens_seen
    return state_lib.init_sharded(run.model, tx, run.train.seed, mesh), run, tokens_seen


def train(run: RunConfig) -> Summary:
    t = run.train
    model_dir = pathlib.Path(t.model_dir)
    mesh = sharding.make_mesh(**t.mesh)
    program_lib.check_batch_fits_mesh(t.batch_size, t.microbatches, mesh)
    check_vocab(run.mixture.tokenizer, run.model.vocab_size)  # before any expensive work
    pipe = data_pipeline.build(run.mixture, process_index=jax.process_index(), process_count=jax.process_count())
    names = pipe.component_names
    eval_names, eval_batches = _eval_batches(run)
    ckpt = checkpoint.Checkpointer(model_dir, run.checkpoint, run.model)
    state, run, tokens_seen = _initial_state(run, optimizer.make(run.optimizer, t.train_steps), mesh, ckpt,
                                             pipe.iterator, names)
    program = program_lib.build(run, mesh, len(names))  # after init_from, which may replace run.model
    start = int(state.step)
    if jax.process_index() == 0:
        write_operative_config(run, model_dir)
        tokenizer_dir = run_metadata.copy_tokenizer(run.mixture.tokenizer, model_dir)
    else:
        tokenizer_dir = model_dir / "tokenizer"

    graphdef, spec = program.graphdef, program.batch_spec
    compile_start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = program.train_step.lower(state, program.example_batch(t.batch_size, t.seq_len)).compile()
    log.info("compiled the train step in %.1fs", time.perf_counter() - compile_start)
    eval_fn = step_lib.jit_eval_step(program.state_shardings.params, mesh, t.batch_size, graphdef=graphdef,
                                     num_components=len(eval_names)) if eval_batches else None

    peak, peak_source = metrics.peak_flops_per_device(t.hardware, t.peak_flops)
    flops_per_token = metrics.train_flops_per_token(run.model, t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len
    window = metrics.Window(names)
    sinks = metrics.Sinks(model_dir, resume_step=start, run_name=model_dir.name, wandb_project=t.wandb_project)
    bar = _progress(t, start)
    last_rec: dict[str, Any] = {}
    eval_loss: dict[str, float] = {}
    stopped, last_saved = "done", (start if ckpt.latest_step() == start else None)
    step = start

    def save(s: int) -> None:
        nonlocal last_saved
        if last_saved != s:
            ckpt.save(state, pipe.iterator, run_metadata.build(run.model, run.mixture, step=s,
                                                               tokens_seen=tokens_seen))
            last_saved = s

    try:
        with _Preemption() as preemption, jax.set_mesh(mesh):
            while step < t.train_steps:
                if preemption.requested:
                    stopped = "preempted"
                    break
                try:
                    local = next(pipe.iterator)
                except StopIteration:
                    stopped = "data_exhausted"
                    break
                batch = multihost.global_batch(local, mesh, spec)
                tick = time.perf_counter()
                state, m = compiled(state, batch)
                m = jax.device_get(m)
                seconds = time.perf_counter() - tick
                step += 1
                if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                    raise NonFiniteLoss(
                        f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']}; stopped without saving. The last "
                        f"good checkpoint is {ckpt.directory}/{ckpt.latest_step()} (untouched). Lower the "
                        "learning rate or check the data, then rerun the same command to resume from it.")
                for name, n in zip(names, np.asarray(m["component_tokens"])):
                    tokens_seen[name] += int(n)
                window.add(m, seconds)
                evaluate = eval_fn is not None and (step % t.eval_every == 0 or step == t.train_steps)
                if evaluate:
                    eval_loss = _evaluate(eval_fn, state.params, eval_names, eval_batches, mesh, spec)
                if step % t.log_every == 0 or step == t.train_steps or evaluate or step == start + 1:
                    last_rec = window.record(step, m, tokens_seen, tokens_per_step, flops_per_token,
                                             peak * mesh.size)
                    last_rec.update({f"eval/loss/{k}": v for k, v in eval_loss.items()} if evaluate else {})
                    sinks.write(last_rec)
                    window.reset()
                    _show(bar, last_rec)
                if step % run.checkpoint.every == 0:
                    save(step)
                if run.checkpoint.export_every and step % run.checkpoint.export_every == 0:
                    export.export(nnx.merge(graphdef, state.params), model_dir / "exports" / str(step),
                                  dtype=run.checkpoint.export_dtype, tokenizer_dir=tokenizer_dir)
                if bar is not None:
                    bar.update(1)
            save(step)
            export_dir = None
            if stopped == "done" and run.checkpoint.export_at_end:
                export_dir = export.export(nnx.merge(graphdef, state.params), model_dir / "hf",
                                           dtype=run.checkpoint.export_dtype, tokenizer_dir=tokenizer_dir)
    finally:
        if bar is not None:
            bar.close()
        sinks.close()
        ckpt.close()  # waits for in-flight async saves (good checkpoints) even when stopping on an error
    return Summary(model_dir=model_dir, step=step, stopped=stopped, loss=last_rec.get("loss"),
                   component_loss={n: last_rec.get(f"loss/{n}") for n in names}, eval_loss=eval_loss,
                   tokens_per_s=last_rec.get("tokens_per_s", 0.0), mfu=last_rec.get("mfu", 0.0),
                   peak_source=peak_source,
                   checkpoint=ckpt.directory / str(last_saved) if last_saved is not None else None,
                   export=export_dir)


def _evaluate(eval_fn, params, names, batches, mesh, spec) -> dict[str, float]:
    loss, weight = np.zeros(len(names)), np.zeros(len(names))
    for b in batches:
        sums = jax.device_get(eval_fn(params, multihost.global_batch(b, mesh, spec)))
        loss += np.asarray(sums.per_component_loss)
        weight += np.asarray(sums.per_component_weight)
    return {n: float(loss[i] / weight[i]) for i, n in enumerate(names) if weight[i] > 0}


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
