"""Orbax checkpoints of a run: one Composite per step, async, atomic, with a keep policy; and `restore_model`.

Layout: MODEL_DIR/checkpoints/<step>/ holds the items
  params/    the model parameters, stacked layer layout (trainer.checkpoint_tree)
  opt_state/ {'opt_state': optimizer state (moments stacked like params), 'step': int32}
  data/      the Grain iterator state, `process_<i>-of-<n>.json` per process
  metadata/  JSON: model config, tokenizer sha256, mixture, tokens seen, code version, layout (trainer.run_metadata)
Params and optimizer state are separate items so evaluation can restore the parameters alone. Orbax writes each
step to a temporary directory and renames it on commit, so a step directory that exists is complete; leftovers of
an interrupted save are removed when the manager opens.
"""
from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from models import layout
from models.config import ModelConfig
from models.sharding import make_mesh
from models.transformer import Transformer
from trainer import checkpoint_tree, run_metadata
from trainer.run_config import CheckpointConfig
from trainer.state import TrainState

CHECKPOINTS = "checkpoints"


def _manager(directory: pathlib.Path, config: CheckpointConfig | None, read_only: bool = False
             ) -> ocp.CheckpointManager:
    config = config or CheckpointConfig()
    policies = [ocp.checkpoint_managers.LatestN(config.keep_latest)]
    if config.keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(config.keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=config.async_save and not read_only,
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpointer:
    """Saves and restores a run's TrainState + data iterator + metadata under MODEL_DIR/checkpoints."""

    def __init__(self, model_dir: str | pathlib.Path, config: CheckpointConfig, model_config: ModelConfig):
        self.directory = pathlib.Path(model_dir) / CHECKPOINTS
        self.model_config = model_config
        self.manager = _manager(self.directory, config)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, iterator: grain.DatasetIterator, metadata: dict[str, Any]) -> None:
        """Starts an async save of step `metadata['step']`; returns once device arrays are copied to host."""
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
        """Restores step `step` onto `mesh` (any mesh shape) and sets `iterator` to the saved data position."""
        target = checkpoint_tree.abstract_tree(abstract_state, self.model_config, mesh)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]),
            opt_state=ocp.args.StandardRestore({"opt_state": target["opt_state"], "step": target["step"]}),
            data=grain.checkpoint.CheckpointRestore(iterator)))
        tree = {"params": restored["params"], **restored["opt_state"]}
        return checkpoint_tree.from_tree(tree, abstract_state, self.model_config)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(model_dir: str | pathlib.Path, model: Transformer, metadata: dict[str, Any], step: int = 0
                ) -> pathlib.Path:
    """Writes a params-only checkpoint (items `params`, `metadata`) at MODEL_DIR/checkpoints/<step>, synchronously.

    restore_model and TrainConfig.init_from read it; it cannot be resumed (no optimizer or data state).
    """
    directory = pathlib.Path(model_dir) / CHECKPOINTS
    manager = _manager(directory, CheckpointConfig(async_save=False))
    try:
        pure = layout.to_stacked(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config)
        manager.save(step, force=True, args=ocp.args.Composite(params=ocp.args.StandardSave(pure),
                                                               metadata=ocp.args.JsonSave(metadata)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory / str(step)


def _locate(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, int]:
    """(run dir, checkpoints dir, step) for a run directory (latest step) or one step directory."""
    path = pathlib.Path(path)
    if (path / CHECKPOINTS).is_dir():
        run_dir, ckpt_dir = path, path / CHECKPOINTS
        manager = _manager(ckpt_dir, None, read_only=True)
        step = manager.latest_step()
        manager.close()
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no committed checkpoint")
        return run_dir, ckpt_dir, step
    if path.name.isdigit() and (path / "params").is_dir() and path.parent.name == CHECKPOINTS:
        return path.parent.parent, path.parent, int(path.name)
    raise FileNotFoundError(f"{path}: neither a run directory (with {CHECKPOINTS}/) nor a checkpoint step directory "
                            f"(<run>/{CHECKPOINTS}/<step>/params)")


def read_metadata(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, int, dict[str, Any]]:
    """(run dir, checkpoints dir, step, metadata) of a run directory (latest step) or one step directory."""
    run_dir, ckpt_dir, step = _locate(path)
    manager = _manager(ckpt_dir, None, read_only=True)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    finally:
        manager.close()
    return run_dir, ckpt_dir, step, meta


def restore_params(ckpt_dir: pathlib.Path, step: int, config: ModelConfig, mesh: Mesh) -> Transformer:
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
                  ) -> tuple[Transformer, ModelConfig, pathlib.Path]:
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
