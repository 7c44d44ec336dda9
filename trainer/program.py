"""The compiled training program for a mesh: optimizer, abstract state, state shardings and the jitted step.

`build(run, mesh)` is the one place that turns a RunConfig into what runs on devices. train.py's loop and the
ahead-of-time compile check (`launch.aot`) both use it, so a compile for a TPU topology checks the same program that a
run executes. Nothing here reads checkpoints, INIT_FROM or corpora: everything is derived from shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from models import sharding
from trainer import optimizer, state as state_lib, step as step_lib
from trainer.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Program:
    mesh: Mesh
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    abstract_state: state_lib.TrainState     # ShapeDtypeStructs (no arrays allocated)
    state_shardings: Any                      # NamedSharding tree matching abstract_state
    train_step: Callable                      # jitted (state, global batch) -> (state, metrics), state donated
    batch_spec: P                             # rows over the data-parallel axes
    loss_chunk: int | None = None             # TrainConfig.loss_chunk, for the eval step too

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Abstract global batch (design.md's batch keys) for compiling the step ahead of the loop."""
        shardings = step_lib.batch_shardings(self.mesh, batch_size)
        kinds = {"tokens": (np.int32, 2), "segment_ids": (np.int32, 2), "positions": (np.int32, 2),
                 "loss_mask": (np.float32, 2), "component": (np.int32, 1)}
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len)[:nd], dt, sharding=shardings[k])
                for k, (dt, nd) in kinds.items()}

    def eval_step(self, batch_size: int, num_components: int) -> Callable:
        """The jitted held-out loss step (params, global batch) -> LossSums over `num_components` components."""
        return step_lib.jit_eval_step(self.state_shardings.params, self.mesh, batch_size, graphdef=self.graphdef,
                                      num_components=num_components, loss_chunk=self.loss_chunk)


def check_batch_fits_mesh(batch_size: int, microbatches: int, mesh: Mesh) -> None:
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % rows or (batch_size // microbatches) % rows:
        raise ValueError(f"BATCH_SIZE={batch_size} (microbatches={microbatches}) must split evenly over the "
                         f"{rows} data-parallel devices of mesh {dict(mesh.shape)}: each microbatch of "
                         f"BATCH_SIZE / TrainConfig.microbatches rows needs a multiple of {rows} rows")


def build(run: RunConfig, mesh: Mesh, num_components: int) -> Program:
    """The program of `run` on `mesh` for a mixture of `num_components` components."""
    t = run.train
    check_batch_fits_mesh(t.batch_size, t.microbatches, mesh)
    tx = optimizer.make(run.optimizer, t.train_steps)
    abstract = state_lib.abstract(run.model, tx)
    state_sh = sharding.state_shardings(abstract, mesh)
    graphdef = state_lib.model_graphdef(run.model)
    step_fn = step_lib.jit_train_step(
        state_sh, mesh, t.batch_size, graphdef=graphdef, tx=tx,
        lr_schedule=optimizer.schedule(run.optimizer, t.train_steps),
        config=step_lib.StepConfig(num_components=num_components, microbatches=t.microbatches, z_loss=t.z_loss,
                                  loss_chunk=t.loss_chunk))
    return Program(mesh=mesh, tx=tx, graphdef=graphdef, abstract_state=abstract, state_shardings=state_sh,
                   train_step=step_fn, batch_spec=step_lib.batch_spec(mesh, t.batch_size), loss_chunk=t.loss_chunk)
