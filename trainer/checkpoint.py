"""Orbax checkpoints of a run: one Composite per step, async, atomic, with a keep policy; and `restore_model`.

Layout: MODEL_DIR/checkpoints/<step>/ holds the items
  params/    the model parameters, stacked layer layout (trainer.checkpoint_tree)
  opt_state/ {'opt_state': optimizer state (moments stacked like params), 'step': int32}
  data/      the Grain iterator state, `process_<i>-of-<n>.json` per process
  metadata/  JSON: model config, tokenizer sha256, mixture, tokens seen, code version, layout (trainer.run_metadata)
Params and optimizer state are separate items so evaluation can restore the parameters alone. Orbax writes each
step to a temporary directory and renames it on commit, so a step directory that exists is complete; leftovers of
an interrupted save are removed when the manager opens.

Which checkpoints are good (a finite loss was computed from them), retention of the newest good one, and the
fallback past checkpoints that cannot be resumed are in trainer.checkpoint_health. On gs://, a read that fails is
first retried (RESTORE_ATTEMPTS, with backoff): a transient storage error that outlasted the clients' own retries does
not make the newest checkpoint count as damaged.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Callable, TypeVar

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

import exit_codes
import storage
from data.pipeline import DataStateMismatch, merge_process_states
from models import layout
from models.config import ModelConfig
from models.sharding import make_mesh
from models.transformer import Transformer
from trainer import checkpoint_health as health, checkpoint_tree, consensus, run_metadata
from trainer.run_config import CheckpointConfig
from trainer.state import TrainState

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
RESTORE_ATTEMPTS = 3     # reads of one checkpoint on gs:// before it counts as damaged
RESTORE_BACKOFF_S = 5.0  # before the second attempt; doubled before each later one
T = TypeVar("T")


class _ReadOnlyNotice(logging.Filter):
    """Orbax warns each time a CheckpointManager is opened read-only ("Given directory is read only=DIR"); docmix opens
    them read-only on purpose, to read a run without touching it (probes, export, resume checks), several times per
    command. Only that message is dropped (tests/test_quiet.py fails if Orbax changes its wording)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_ReadOnlyNotice())  # Orbax logs through absl's logger


class NoResumableCheckpoint(RuntimeError):
    """Every committed checkpoint in MODEL_DIR failed to restore (nothing was moved)."""
    exit_code = exit_codes.USAGE


def _manager(directory: storage.Path, config: CheckpointConfig | None, read_only: bool = False,
             keep: health.PreserveStep | None = None) -> ocp.CheckpointManager:
    config = config or CheckpointConfig()
    policies = [ocp.checkpoint_managers.LatestN(config.keep_latest)]
    if config.keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(config.keep_every))
    if keep is not None:
        policies.append(keep)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=config.async_save and not read_only, save_interval_steps=0 if read_only else 1,
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(storage.absolute(directory), options=options)


class Checkpointer:
    """Saves and restores a run's TrainState + data iterator + metadata under MODEL_DIR/checkpoints."""

    def __init__(self, model_dir: str | pathlib.Path, config: CheckpointConfig, model_config: ModelConfig):
        self.directory = storage.Path(model_dir) / CHECKPOINTS  # local or gs://
        self.model_config = model_config
        self.verdicts = health.read_verdicts(self.directory)  # step -> GOOD | NONFINITE, recorded or not yet
        self._unrecorded: dict[int, tuple[str, str]] = {}      # verdicts of steps whose save may be in flight
        self._saved: set[int] = set()
        self.manager = _manager(self.directory, config, keep=health.PreserveStep(self.newest_good))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def resume_candidate(self) -> int | None:
        """The newest committed step not known to give a non-finite loss (what restore_resumable tries first)."""
        return max((s for s in self.all_steps() if self.verdicts.get(s) != health.NONFINITE), default=None)

    def newest_good(self) -> int | None:
        """The newest step whose parameters gave a finite loss (retention never deletes it)."""
        return health.newest(self.verdicts, health.GOOD)

    def mark_good(self, step: int) -> None:
        """The loss computed from the parameters of `step` was finite: its checkpoint, if any, is good."""
        if self.verdicts.get(step) != health.GOOD and (step in self._saved or step in self.all_steps()):
            self._set_verdict(step, health.GOOD, f"a finite loss was computed from these parameters at step {step + 1}")

    def mark_nonfinite(self, step: int, what: str = "loss") -> list[int]:
        """The loss (or `what` else: "gradient norm") from the parameters of `step` was NaN/Inf: marks every checkpoint
        >= `step` (their parameters produced it or descend from those that did). Waits for in-flight saves; returns
        the steps marked."""
        self.manager.wait_until_finished()
        bad = [s for s in self.all_steps() if s >= step]
        for s in bad:
            self._set_verdict(s, health.NONFINITE, f"a non-finite {what} was computed at step {step + 1} from the "
                                                   f"parameters of step {step}")
        self._record()
        return bad

    def _set_verdict(self, step: int, verdict: str, detail: str) -> None:
        self.verdicts[step] = verdict
        self._unrecorded[step] = (verdict, detail)

    def _record(self) -> None:
        """Writes the verdicts held in memory; call only when no save is in flight (their steps are committed)."""
        for step, (verdict, detail) in sorted(self._unrecorded.items()):
            if jax.process_index() == 0:
                health.write_verdict(self.directory, step, verdict, detail)
        self._unrecorded.clear()

    def save(self, state: TrainState, iterator: grain.DatasetIterator, metadata: dict[str, Any]) -> None:
        """Starts an async save of step `metadata['step']`; returns once device arrays are copied to host."""
        self.manager.wait_until_finished()  # Orbax waits for the previous save anyway; then its verdict can be written
        self._record()
        self._saved.add(metadata["step"])
        tree = checkpoint_tree.to_tree(state, self.model_config)
        self.manager.save(metadata["step"], force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(tree["params"]),
            opt_state=ocp.args.StandardSave({"opt_state": tree["opt_state"], "step": tree["step"]}),
            data=grain.checkpoint.CheckpointSave(iterator),
            metadata=ocp.args.JsonSave(metadata)))

    def metadata(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

    def restore(self, step: int, abstract_state: TrainState, mesh: Mesh,
                iterator: grain.DatasetIterator) -> TrainState:
        """Restores step `step` onto `mesh` (any mesh shape) and sets `iterator` to the saved data position (saved
        by any number of processes: restore_data). Raises DataStateMismatch when the data position does not fit."""
        target = checkpoint_tree.abstract_tree(abstract_state, self.model_config, mesh)
        restore_data(self.directory / str(step) / "data", iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]),
            opt_state=ocp.args.StandardRestore({"opt_state": target["opt_state"], "step": target["step"]})))
        tree = {"params": restored["params"], **restored["opt_state"]}
        return checkpoint_tree.from_tree(tree, abstract_state, self.model_config)

    def restore_resumable(self, abstract_state: TrainState, mesh: Mesh, iterator: grain.DatasetIterator,
                          check: Callable[[dict[str, Any], int], None]
                          ) -> tuple[int, dict[str, Any], TrainState] | None:
        """(step, metadata, state) of the newest checkpoint that can be resumed; None when there is none.

        Skips checkpoints marked non-finite and ones that fail to restore (damaged), newest first, and sets them
        aside with a warning once an older one has restored. `check(metadata, step)` raises when the run's config
        does not fit the checkpoint, and restoring raises DataStateMismatch when its data position does not fit
        this run's data shards; that is not damage and propagates at once. When every checkpoint fails to restore,
        the cause is more likely this machine than the files: NoResumableCheckpoint, nothing moved.

        With several processes every choice is common: process 0 lists the steps and their verdicts, and a step one
        process cannot read is skipped by all (trainer.consensus), so no two processes resume different steps.
        """
        listed = consensus.from_process_0("listing MODEL_DIR's checkpoints",
                                          lambda: [[s, self.verdicts.get(s)] for s in self.all_steps()])
        self.verdicts = {s: v for s, v in listed if v is not None}
        skipped: list[tuple[int, str]] = []
        first_error: Exception | None = None
        for step in sorted((s for s, _ in listed), reverse=True):
            if self.verdicts.get(step) == health.NONFINITE:
                skipped.append((step, "a non-finite loss was computed from its parameters"))
                continue
            meta, damage = self._retried(f"reading the metadata of {self.directory}/{step}", lambda: self.metadata(step))
            if damage is None:
                check(meta, step)
                state, damage = self._retried(f"restoring {self.directory}/{step}",
                                              lambda: self.restore(step, abstract_state, mesh, iterator),
                                              reraise=(DataStateMismatch,))
            if damage is not None:  # any read failure of one checkpoint means: try the previous one
                skipped.append((step, f"damaged: {damage}"))
                first_error = first_error or RuntimeError(damage)
                continue
            self._set_aside(skipped)
            return step, meta, state
        if first_error is not None:
            raise NoResumableCheckpoint(
                f"{self.directory}: no checkpoint could be restored (" + "; ".join(f"{s}: {why}" for s, why in skipped)
                + "). Nothing was moved or deleted; check the files and this machine's memory and storage access."
            ) from first_error
        self._set_aside(skipped)
        return None

    def _retried(self, what: str, read: Callable[[], T], reraise: tuple[type[BaseException], ...] = ()
                 ) -> tuple[T | None, str | None]:
        """(read(), None), or (None, why it failed) once every attempt failed: up to RESTORE_ATTEMPTS attempts with
        backoff when the checkpoints are on an object store (transient errors), one locally. Each attempt's outcome is
        agreed (consensus.outcome), so all processes retry, or give up, together; `reraise` types propagate at once."""
        attempts = RESTORE_ATTEMPTS if storage.is_remote(self.directory) else 1
        value, damage = consensus.outcome(read, health.short_error, reraise=reraise)
        for attempt in range(1, attempts):
            if damage is None:
                break
            wait = RESTORE_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d of %d: %s); retrying in %.0fs", what, attempt, attempts, damage, wait)
            time.sleep(wait)
            value, damage = consensus.outcome(read, health.short_error, reraise=reraise)
        return value, damage

    def _set_aside(self, skipped: list[tuple[int, str]]) -> None:
        with consensus.together("setting aside checkpoints it does not resume"):  # moved by process 0, then seen by all
            for step, why in skipped:
                where = self.directory / str(step)
                if jax.process_index() == 0:
                    where = health.set_aside(self.directory, step, f"step {step} was not resumed: {why}")
                log.warning("not resuming from checkpoint %s/%d (%s); it is kept, moved to %s", self.directory, step,
                            why, where)
                self.verdicts.pop(step, None)
        if skipped:
            self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._record()
        self.manager.close()


def restore_data(directory: storage.Path, iterator: grain.DatasetIterator) -> None:
    """Sets `iterator` to the position in a checkpoint's `data` item, where Grain wrote each process's iterator state
    as process_<i>-of-<n>.json. Saved by as many processes as this run has: this process's own state. Saved by
    another number: all of them merged (data.pipeline.merge_process_states), from which this process's pipeline takes
    its data shards; DataStateMismatch when the shards do not fit."""
    found = {}
    for f in directory.glob("process_*-of-*.json"):
        index, _, count = f.stem.removeprefix("process_").partition("-of-")
        found[int(index)] = (int(count), f)
    counts = {count for count, _ in found.values()}
    if len(counts) != 1 or sorted(found) != list(range(next(iter(counts)))):
        names = sorted(f.name for _, f in found.values())
        raise FileNotFoundError(f"{directory}: the data iterator states are incomplete ({names})")
    states = [json.loads(found[i][1].read_text()) for i in sorted(found)]
    if len(states) == jax.process_count():
        iterator.set_state(states[jax.process_index()])
    else:
        iterator.set_state(merge_process_states(states))


def save_params(model_dir: str | pathlib.Path, model: Transformer, metadata: dict[str, Any], step: int = 0
                ) -> storage.Path:
    """Writes a params-only checkpoint (items `params`, `metadata`) at MODEL_DIR/checkpoints/<step>, synchronously.

    restore_model and TrainConfig.init_from read it; it cannot be resumed (no optimizer or data state).
    """
    directory = storage.Path(model_dir) / CHECKPOINTS
    manager = _manager(directory, CheckpointConfig(async_save=False))
    try:
        pure = layout.to_stacked(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config)
        manager.save(step, force=True, args=ocp.args.Composite(params=ocp.args.StandardSave(pure),
                                                               metadata=ocp.args.JsonSave(metadata)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory / str(step)


def _locate(path: str | pathlib.Path) -> tuple[storage.Path, storage.Path, int]:
    """(run dir, checkpoints dir, step) for a run directory (latest step not marked non-finite) or one step directory."""
    path = storage.Path(path)
    if (path / CHECKPOINTS).is_dir():
        run_dir, ckpt_dir = path, path / CHECKPOINTS
        manager = _manager(ckpt_dir, None, read_only=True)
        steps = manager.all_steps()
        manager.close()
        verdicts = health.read_verdicts(ckpt_dir)
        usable = [s for s in steps if verdicts.get(s) != health.NONFINITE]
        if not usable:
            raise FileNotFoundError(f"{ckpt_dir}: no committed checkpoint"
                                    + (" that did not give a non-finite loss" if steps else ""))
        if max(usable) != max(steps):
            log.warning("%s: skipping checkpoints %s (a non-finite loss was computed from them); reading step %d",
                        ckpt_dir, sorted(set(steps) - set(usable)), max(usable))
        return run_dir, ckpt_dir, max(usable)
    if path.name.isdigit() and (path / "params").is_dir() and path.parent.name == CHECKPOINTS:
        return path.parent.parent, path.parent, int(path.name)
    raise FileNotFoundError(f"{path}: neither a run directory (with {CHECKPOINTS}/) nor a checkpoint step directory "
                            f"(<run>/{CHECKPOINTS}/<step>/params)")


def read_metadata(path: str | pathlib.Path) -> tuple[storage.Path, storage.Path, int, dict[str, Any]]:
    """(run dir, checkpoints dir, step, metadata) of a run directory (latest step) or one step directory."""
    run_dir, ckpt_dir, step = _locate(path)
    manager = _manager(ckpt_dir, None, read_only=True)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    finally:
        manager.close()
    return run_dir, ckpt_dir, step, meta


def restore_params(ckpt_dir: storage.Path, step: int, config: ModelConfig, mesh: Mesh) -> Transformer:
    """The `params` item of one step as a Transformer for `config` (any runtime layout and param dtype) on `mesh`."""
    graphdef, abstract, target = checkpoint_tree.abstract_params(config, mesh)
    manager = _manager(ckpt_dir, None, read_only=True)
    try:
        pure = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    finally:
        manager.close()
    params = checkpoint_tree.fill(abstract, layout.from_stacked(pure, config), f"{ckpt_dir}/{step}/params")
    return nnx.merge(graphdef, params)


def restore_model(path: str | pathlib.Path, *, mesh: Mesh | None = None
                  ) -> tuple[Transformer, ModelConfig, storage.Path]:
    """Loads the parameters of a run directory (its latest checkpoint) or of one step directory.

    Returns (Transformer with sharded params on `mesh` — one device when None —, ModelConfig, tokenizer dir).
    Only the `params` item is read; the optimizer state stays on disk.
    """
    run_dir, ckpt_dir, step, meta = read_metadata(path)
    config = run_metadata.model_config_from_dict(meta["model_config"])
    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: tokenizer.json missing (every run copies its tokenizer there)")
    model = restore_params(ckpt_dir, step, config, mesh or make_mesh(devices=jax.devices()[:1]))
    return model, config, tokenizer_dir
