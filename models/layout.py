"""Conversion between the runtime layer layout and the canonical stacked layout that checkpoints always use.

Runtime trees come from `nnx.to_pure_dict(nnx.state(model, ...))`: with `scan_layers=True` the block parameters sit at
`layers/<name>` with a leading `[num_layers]` axis (the canonical layout); with `scan_layers=False` they sit at
`layers/<i>/<name>` for i = 0..num_layers-1. These functions work on any tree of that shape: parameters, Adam moments,
gradients, or abstract `jax.ShapeDtypeStruct` trees (whose NamedSharding gains/loses a leading unsharded axis).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from models.config import ModelConfig


def _stack(*leaves: Any) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype, sharding=sharding)
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[i]


def to_stacked(tree: dict, config: ModelConfig) -> dict:
    """Runtime layout of `config` -> stacked layout (identity when `config.scan_layers`)."""
    if config.scan_layers:
        return tree
    layers = tree["layers"]
    expected = set(range(config.num_layers))
    if set(layers) != expected:
        raise ValueError(f"to_stacked: tree['layers'] has keys {sorted(layers, key=str)}, expected layer indices "
                         f"0..{config.num_layers - 1} (is the tree already stacked?)")
    stacked = jax.tree.map(_stack, *[layers[i] for i in range(config.num_layers)])
    return {**tree, "layers": stacked}


def from_stacked(tree: dict, config: ModelConfig) -> dict:
    """Stacked layout -> runtime layout of `config` (identity when `config.scan_layers`)."""
    if config.scan_layers:
        return tree
    stacked = tree["layers"]
    leading = {getattr(leaf, "shape", (None,))[0] for leaf in jax.tree.leaves(stacked)}
    if leading != {config.num_layers}:
        raise ValueError(f"from_stacked: leading axes {leading} of tree['layers'] are not num_layers="
                         f"{config.num_layers} (is the tree already unrolled?)")
    layers = {i: jax.tree.map(lambda leaf: _unstack(leaf, i), stacked) for i in range(config.num_layers)}
    return {**tree, "layers": layers}
