"""The train state (step, params, optimizer state) and its `jax.eval_shape`-able initialisation (shardings:
`models.sharding.state_shardings`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from models import sharding
from models.config import ModelConfig
from models.transformer import Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """`params` is the model's nnx.State of Params; `opt_state` mirrors it (moments keep the Params' metadata)."""
    step: jax.Array
    params: Any
    opt_state: Any


def model_graphdef(config: ModelConfig) -> nnx.GraphDef:
    """The static structure of the model (no arrays are allocated)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef


def create(config: ModelConfig, tx: optax.GradientTransformation, seed: int, params: Any = None) -> TrainState:
    """A fresh state: random init from `seed`, or the given `params` (e.g. from a Hugging Face folder)."""
    if params is None:
        _, params = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract(config: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs of the state: what an AOT compile for a TPU topology or an Orbax restore needs."""
    return jax.eval_shape(lambda: create(config, tx, 0))


def _compile_once(fn, mesh: Mesh, out_shardings: Any, *args: Any) -> Any:
    """Runs a one-off jitted function. On CPU it is compiled at XLA optimisation level 0: these programs run once,
    and the default level spends far longer compiling threefry random init than it could ever save."""
    options = {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" else {}
    with jax.set_mesh(mesh):
        return jax.jit(fn, out_shardings=out_shardings).lower(*args).compile(compiler_options=options)(*args)


def init_sharded(config: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh: Mesh) -> TrainState:
    """Random init compiled straight into its shardings (no host copy of the full model)."""
    return _compile_once(lambda: create(config, tx, seed), mesh, sharding.state_shardings(abstract(config, tx), mesh))


def from_params(config: ModelConfig, tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> TrainState:
    """A step-0 state around existing (already placed) params, e.g. loaded from a Hugging Face folder."""
    out_shardings = sharding.state_shardings(abstract(config, tx), mesh)
    return _compile_once(lambda p: create(config, tx, 0, p), mesh, out_shardings, params)
