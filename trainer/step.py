"""The train step: a pure function (state, batch) -> (state, metrics), jitted with explicit shardings and donation.

Gradient accumulation splits the global batch into `microbatches` interleaved slices (row i goes to microbatch
i % M, so every device keeps an equal share of each) and sums gradients with `jax.lax.scan`. Losses are weighted
sums divided once by the weight of the whole batch, so the result does not depend on M or the mesh beyond rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import sharding
from trainer import loss as loss_lib
from trainer.state import TrainState

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask", "component")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_components: int
    microbatches: int = 1
    z_loss: float = 0.0
    loss_chunk: int | None = None   # sequence positions per block of logits (None: all logits at once)


def _forward_sums(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], num_components: int,
                  loss_chunk: int | None = None):
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden(batch["tokens"], batch["segment_ids"], batch["positions"])
    if loss_chunk is None:  # the last position predicts nothing: dropped before the projection, not after
        return loss_lib.predicting_loss_sums(model.logits(hidden[:, :-1]), batch, num_components)
    return loss_lib.chunked_loss_sums(hidden, model.output_kernel(), batch, num_components, loss_chunk)


def _split_microbatches(batch: dict[str, jax.Array], m: int) -> dict[str, jax.Array]:
    """`[B, ...]` -> `[m, B/m, ...]` with row i in microbatch i % m."""
    def split(x):
        x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))
    return {k: split(v) for k, v in batch.items()}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
               config: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (`[B, S]` arrays, `component` `[B]`). Metrics are device scalars/`[C]`."""
    total_weight = jnp.sum(loss_lib.target_weights(batch["segment_ids"], batch["loss_mask"]))

    def objective(params, mb):
        sums = _forward_sums(graphdef, params, mb, config.num_components, config.loss_chunk)
        return loss_lib.objective(sums, config.z_loss, total_weight), sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if config.microbatches == 1:
        (_, sums), grads = grad_fn(state.params, batch)
    else:
        def accumulate(carry, mb):
            (_, sums), grads = grad_fn(state.params, mb)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, state.params), loss_lib.zero_sums(config.num_components))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, _split_microbatches(batch, config.microbatches))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_lib.mean_loss(sums),
        "z_loss": sums.z_loss / jnp.maximum(sums.weight, 1.0),
        "grad_norm": optax.global_norm(grads),
        "lr": lr_schedule(state.step),
        "loss_weight": sums.weight,
        "component_loss_sum": sums.per_component_loss,
        "component_weight": sums.per_component_weight,
        "component_tokens": component_tokens(batch, config.num_components),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def component_tokens(batch: dict[str, jax.Array], num_components: int) -> jax.Array:
    """`[C]` non-padding tokens of each component in the batch (exact over the global batch)."""
    rows = jnp.sum(batch["segment_ids"] > 0, axis=1, dtype=jnp.int32)
    return jnp.zeros((num_components,), jnp.int32).at[batch["component"]].add(rows)


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              num_components: int, loss_chunk: int | None = None) -> loss_lib.LossSums:
    """Loss sums of a held-out batch (no gradients)."""
    return _forward_sums(graphdef, params, batch, num_components, loss_chunk)


def batch_spec(mesh: Mesh, batch_size: int) -> P:
    """The batch dimension's PartitionSpec: rows split over the data-parallel axes (`act_batch`)."""
    return P(*sharding.logical_to_spec(("act_batch",), (batch_size,), dict(mesh.shape)))


def batch_shardings(mesh: Mesh, batch_size: int) -> dict[str, NamedSharding]:
    """Each batch key's sharding: rows as `batch_spec`, sequence replicated."""
    rows = batch_spec(mesh, batch_size)
    return {k: NamedSharding(mesh, P(*rows, None) if k != "component" else rows) for k in BATCH_KEYS}


def jit_train_step(state_shardings: Any, mesh: Mesh, batch_size: int, **kwargs: Any) -> Callable:
    """`jax.jit(train_step)` with explicit in/out shardings and the state donated."""
    replicated = NamedSharding(mesh, P())
    fn = lambda state, batch: train_step(state, batch, **kwargs)  # noqa: E731 (bind the static parts)
    return jax.jit(fn, in_shardings=(state_shardings, batch_shardings(mesh, batch_size)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(param_shardings: Any, mesh: Mesh, batch_size: int, **kwargs: Any) -> Callable:
    replicated = NamedSharding(mesh, P())
    fn = lambda params, batch: eval_step(params, batch, **kwargs)  # noqa: E731
    return jax.jit(fn, in_shardings=(param_shardings, batch_shardings(mesh, batch_size)), out_shardings=replicated)
