"""The phases before the step loop (trainer.loop): set up (mesh, data, held-out batches, checkpointer) -> the
effective run -> initial state (resume / init_from / scratch) -> compile. Each checks what it can before the next,
more expensive, phase starts."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from data import fingerprint, pipeline as data_pipeline
from data.config import single_component_mixture
from data.tokenize import check_vocab
from models import sharding
from storage import Path
from trainer import (checkpoint, consensus, export, initialize, metrics_file, optimizer, program as program_lib,
                     run_metadata, state as state_lib)
from trainer.config import RunConfig, write_operative_config

log = logging.getLogger(__name__)


# --- phase 1: set up ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """What every phase reads: the mesh, this process's data pipeline, the fixed held-out batches, the checkpointer."""
    run: RunConfig
    model_dir: Path
    mesh: Mesh
    pipe: data_pipeline.Pipeline
    eval_names: tuple[str, ...]
    eval_batches: list[dict[str, np.ndarray]]
    ckpt: checkpoint.Checkpointer
    data_fingerprint: dict[str, Any]  # data.fingerprint of the mixture, recorded in every checkpoint
    logged_step: int = 0  # the furthest step metrics.jsonl held at start (process 0; trainer.goodput's recomputed steps)

    @classmethod
    def create(cls, run: RunConfig) -> "Setup":
        """Checks that the batch fits the mesh and the tokenizer the model before reading any corpus. Every check can
        fail on one host alone (its own files and data shards), so all of them end in one vote."""
        t = run.train
        with consensus.together("checking the run and opening its data shards"):
            _check_export_targets(run, Path(t.model_dir))
            logged_step = _check_metrics(Path(t.model_dir))
            notes = [run.mixture.check_run(jax.process_count()), optimizer.warmup_note(run.optimizer, t.train_steps)]
            mesh = sharding.make_mesh(**t.mesh)
            program_lib.check_batch_fits_mesh(t.batch_size, t.microbatches, mesh)
            check_vocab(run.mixture.tokenizer, run.model.vocab_size)
            for note in notes:
                if note and jax.process_index() == 0:
                    log.warning("%s", note)
            pipe = data_pipeline.build(run.mixture, process_index=jax.process_index(),
                                       process_count=jax.process_count())
            _log_reads(pipe)
            eval_names, eval_batches = _eval_batches(run)
            data_fingerprint = fingerprint.fingerprint(run.mixture)
        model_dir = Path(t.model_dir)  # the checkpoint manager's start-up waits for every process: after the vote
        return cls(run=run, model_dir=model_dir, mesh=mesh, pipe=pipe, eval_names=eval_names,
                   eval_batches=eval_batches, ckpt=checkpoint.Checkpointer(model_dir, run.checkpoint, run.model),
                   data_fingerprint=data_fingerprint, logged_step=logged_step)


def _log_reads(pipe: data_pipeline.Pipeline) -> None:
    """What this process read at start-up: on a pod each host parses only its own data shards' records."""
    for name, report in pipe.reports.items():
        log.info("process %d of %d, data shards %s of %d, component %r: %d records parsed, %d bytes read, "
                 "%d documents", jax.process_index(), jax.process_count(), list(pipe.data_shards), pipe.num_shards,
                 name, report.records_parsed, report.bytes_read, report.documents)


def _check_export_targets(run: RunConfig, model_dir: Path) -> None:
    """The run's export folders must be absent or earlier exports (export.check_target), before any expensive work."""
    if run.checkpoint.export_at_end:
        export.check_target(model_dir / "hf", overwrite=True)
    if run.checkpoint.export_every and (model_dir / "exports").is_dir():
        for folder in (model_dir / "exports").iterdir():
            if folder.name.isdigit():  # exports/<step>, not a crashed export's hidden temporary folder
                export.check_target(folder, overwrite=True)


def _check_metrics(model_dir: Path) -> int:
    """MODEL_DIR/metrics.jsonl must read (trainer.metrics_file: a malformed record is an error naming its line; a
    torn last one is dropped with a warning) before any expensive work, not when the step loop rewrites it. Returns
    the furthest step it logged (0 without one, and on the processes that do not write it)."""
    if jax.process_index() != 0:  # the one process that writes it
        return 0
    return max((r["step"] for r in metrics_file.read(model_dir / metrics_file.NAME)), default=0)


def _eval_batches(run: RunConfig) -> tuple[tuple[str, ...], list[dict[str, np.ndarray]]]:
    """(component names, the fixed held-out batches) of the eval mixture; none without one. Each component is read
    as eval.heldout reads it (one unshuffled pass of its own, `TrainConfig.eval_batches` batches or all), so the
    numbers agree; a batch's `component` ids are set to the component's index among the names."""
    if run.eval_mixture is None or not run.train.eval_every:
        return (), []
    names, batches = [], []
    for i, component in enumerate(run.eval_mixture.active_components):
        single = single_component_mixture(run.eval_mixture, component, run.eval_mixture.batch_size)
        pipe = data_pipeline.build(single, process_index=jax.process_index(), process_count=jax.process_count())
        names.append(component.name)
        for batch in itertools.islice(pipe.iterator, run.train.eval_batches):
            batches.append({**batch, "component": np.full_like(batch["component"], i)})
        pipe.iterator.close()
    return tuple(names), batches


def write_run_files(run: RunConfig, model_dir: Path) -> Path:
    """Writes config.gin and the tokenizer copy into MODEL_DIR (process 0); returns the tokenizer folder."""
    with consensus.together("writing config.gin and the tokenizer into MODEL_DIR"):
        if jax.process_index() == 0:
            write_operative_config(run, model_dir)
            run_metadata.copy_tokenizer(run.mixture.tokenizer, model_dir)
    return model_dir / "tokenizer"


# --- phase 2: initial state ---------------------------------------------------------------------------------------

def effective_run(setup: Setup) -> RunConfig:
    """The run as it will train: a run that starts from TrainConfig.init_from (no checkpoint in MODEL_DIR yet) takes
    that folder's network fields in place of the gin model's (shape fields must agree; initialize.reconcile)."""
    run = setup.run
    if not run.train.init_from or consensus.from_process_0("listing MODEL_DIR's checkpoints",
                                                           lambda: setup.ckpt.latest_step() is not None):
        return run
    with consensus.together("reading INIT_FROM's config"):
        model = initialize.resolve_config(run.train.init_from, run.model)
    setup.ckpt.model_config = model  # checkpoints record the effective model
    return dataclasses.replace(run, model=model)


def initial_state(setup: Setup, run: RunConfig, program: program_lib.Program
                  ) -> tuple[state_lib.TrainState, dict[str, int]]:
    """(state, tokens seen per component): resumed from MODEL_DIR's newest resumable checkpoint (and the data iterator
    set to its position; Checkpointer.restore_resumable), else loaded from TrainConfig.init_from, else initialised
    from scratch."""
    ckpt, mesh, names = setup.ckpt, setup.mesh, setup.pipe.component_names
    tokens_seen = {n: 0 for n in names}
    current = run_metadata.build(run.model, run.mixture, step=0, tokens_seen=tokens_seen, optimizer=run.optimizer,
                                 train_steps=run.train.train_steps, data_fingerprint=setup.data_fingerprint)

    def check(saved: dict[str, Any], step: int) -> None:
        run_metadata.check(saved, current, f"{ckpt.directory}/{step}")
        run_metadata.check_optimizer(saved, current, step, f"{ckpt.directory}/{step}")
        run_metadata.check_data(saved, current, f"{ckpt.directory}/{step}", run.train.allow_data_change)

    resumed = ckpt.restore_resumable(program.abstract_state, mesh, setup.pipe.iterator, check)
    if resumed is not None:
        step, saved, state = resumed
        log.info("resuming from %s/%d", ckpt.directory, step)
        return state, {n: int(saved["tokens_seen"].get(n, 0)) for n in names}
    if run.optimizer.schedule_start:
        raise ValueError(f"OptimizerConfig.schedule_start={run.optimizer.schedule_start} starts a new schedule phase "
                         f"when resuming, but {ckpt.directory} holds no checkpoint to resume; remove it")
    if run.train.init_from:
        with consensus.together("loading INIT_FROM's parameters"):
            params, _ = initialize.load_params(run.train.init_from, run.model, mesh)
        log.info("initialised from %s", run.train.init_from)
        return state_lib.from_params(run.model, program.tx, params, mesh), tokens_seen
    return state_lib.init_sharded(run.model, program.tx, run.train.seed, mesh), tokens_seen


# --- phase 3: compile ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    program: program_lib.Program
    train: Callable                  # compiled (state, global batch) -> (state, metrics); donates the state
    eval: Callable | None            # jitted (params, global batch) -> LossSums; None without an eval mixture


def compile_steps(program: program_lib.Program, state: state_lib.TrainState, run: RunConfig,
                  num_eval_components: int) -> CompiledSteps:
    """Compiles the train step ahead of the loop (so its time is reported apart from step time)."""
    t = run.train
    start = time.perf_counter()
    with jax.set_mesh(program.mesh):
        compiled = program.train_step.lower(state, program.example_batch(t.batch_size, t.seq_len)).compile()
    log.info("compiled the train step in %.1fs", time.perf_counter() - start)
    eval_fn = program.eval_step(t.batch_size, num_eval_components) if num_eval_components else None
    return CompiledSteps(program=program, train=compiled, eval=eval_fn)
