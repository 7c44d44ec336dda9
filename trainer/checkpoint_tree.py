"""TrainState <-> the checkpoint tree: plain nested dicts of arrays, parameters always in the stacked layer layout.

Checkpoint items: `params` (the model's `nnx.to_pure_dict`, stacked) and `opt_state` (the optax state, with every
parameter-shaped subtree — Adam moments — converted the same way; scalars such as the step count as they are).
Converting the abstract state with shardings gives the Orbax restore target for any mesh.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh

from models import layout, sharding
from models.config import ModelConfig
from trainer import state as state_lib
from trainer.state import TrainState

LAYOUT = "stacked"


def _is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)


def _pure(st: nnx.State) -> dict:
    return nnx.to_pure_dict(st)


def to_tree(state: TrainState, config: ModelConfig) -> dict[str, Any]:
    """{'params': stacked pure dict, 'opt_state': optax state with param-shaped parts stacked, 'step': scalar}."""
    convert = lambda st: layout.to_stacked(_pure(st), config)  # noqa: E731
    return {"params": convert(state.params),
            "opt_state": jax.tree.map(lambda x: convert(x) if _is_state(x) else x, state.opt_state, is_leaf=_is_state),
            "step": state.step}


def fill(template: nnx.State, pure: dict, what: str) -> nnx.State:
    """A copy of `template` (an nnx.State) with every value taken from `pure`; the key sets must match exactly."""
    flat_template = dict(nnx.to_flat_state(template))
    flat_pure = {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path): v
                 for path, v in traverse_util.flatten_dict(pure).items()}
    missing, unexpected = set(flat_template) - set(flat_pure), set(flat_pure) - set(flat_template)
    if missing or unexpected:
        fmt = lambda keys: sorted("/".join(map(str, k)) for k in keys)[:8]  # noqa: E731
        raise ValueError(f"{what}: checkpoint tree does not match the model: missing {fmt(missing)}, "
                         f"unexpected {fmt(unexpected)}")
    for path, var in flat_template.items():
        value = flat_pure[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{what}: tensor {'/'.join(map(str, path))} has shape {tuple(value.shape)} in the "
                             f"checkpoint, the model expects {tuple(var.shape)}")
    return nnx.from_flat_state([(path, var.replace(flat_pure[path])) for path, var in flat_template.items()])


def from_tree(tree: dict[str, Any], template: TrainState, config: ModelConfig) -> TrainState:
    """Inverse of `to_tree` onto `template`'s structure (an abstract or concrete TrainState)."""
    unstack = lambda t, x, what: fill(t, layout.from_stacked(x, config), what)  # noqa: E731
    params = unstack(template.params, tree["params"], "params")
    opt_state = jax.tree.map(lambda t, x: unstack(t, x, "opt_state") if _is_state(t) else x,
                             template.opt_state, tree["opt_state"], is_leaf=_is_state)
    return TrainState(step=jnp.asarray(tree["step"], jnp.int32), params=params, opt_state=opt_state)


def with_shardings(abstract: Any, mesh: Mesh) -> Any:
    """An abstract tree (TrainState or params State) with each ShapeDtypeStruct carrying its sharding on `mesh`."""
    return jax.tree.map(lambda sh, x: jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh), x),
        sharding.state_shardings(abstract, mesh), abstract)


def abstract_tree(abstract_state: TrainState, config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Orbax restore target: the checkpoint tree of ShapeDtypeStructs sharded for `mesh`."""
    return to_tree(with_shardings(abstract_state, mesh), config)


def abstract_params(config: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, abstract params State, stacked restore target) of a model for `mesh` (no optimizer)."""
    model = nnx.eval_shape(lambda: state_lib.Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, layout.to_stacked(_pure(with_shardings(params, mesh)), config)
