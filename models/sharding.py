"""Logical axis names -> mesh axes (`data`, `fsdp`, `tensor`), the mesh helper and sharded model construction.

Parameters carry logical names in their `out_sharding` metadata (see models.layers); activations are constrained at
layer boundaries with `constrain`. `RULES` is the one table mapping both to mesh axes (T5X/MaxText-style). A mesh axis
that does not divide a dimension (e.g. 3 KV heads on tensor=2) is dropped for that dimension rather than failing, so
any model runs on any mesh; the array is then replicated along that axis.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
)


def _axes_for(name: str | None, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None, rules: Sequence[tuple[str, Any]] = RULES) -> P:
    """PartitionSpec for logical `names`; with `shape` and `mesh_shape`, mesh axes absent from the mesh or not dividing
    the dimension are dropped (as are size-1 axes), and a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = []
        for axis in _axes_for(name, rules):
            if axis in used or (mesh_shape is not None and mesh_shape.get(axis, 1) == 1):
                continue  # absent or size-1 mesh axes add nothing
            if shape is not None and mesh_shape is not None:
                if shape[i] % (math.prod(mesh_shape[a] for a in axes) * mesh_shape[axis]):
                    continue
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint for an activation under the current `jax.set_mesh` mesh; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape)))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, dcn_data: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor"), all `AxisType.Auto`; one size may be -1 (filled from the device count).

    `dcn_data` > 1 spreads the data axis over slices (multi-slice TPU): the mesh's data axis has size dcn_data * data,
    with the slow DCN dimension outermost, so only data-parallel gradient reductions cross slices.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes) or dcn_data < 1:
        raise ValueError(f"make_mesh: sizes data={data} fsdp={fsdp} tensor={tensor} dcn_data={dcn_data}: "
                         "all must be positive, at most one may be -1")
    known = math.prod(s for s in sizes if s != -1) * dcn_data
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) * dcn_data != len(devices):
        raise ValueError(f"make_mesh: data={sizes[0]}*dcn_data={dcn_data} x fsdp={sizes[1]} x tensor={sizes[2]} "
                         f"!= {len(devices)} devices")
    shape = (sizes[0] * dcn_data, sizes[1], sizes[2])
    if dcn_data > 1 and hasattr(devices[0], "slice_index"):
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(tuple(sizes), (dcn_data, 1, 1), devices)
    elif dcn_data > 1:  # no slice information (CPU/GPU): keep device order, DCN dimension outermost
        grid = np.asarray(devices).reshape(shape)
    else:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The sharding tree of an (abstract) state: for every nnx.Variable a NamedSharding from its logical
    `out_sharding` names; any other leaf (a step counter, an optimizer count) replicated. Works on a model's
    nnx.State and on any pytree holding Variables (a train state with optimizer moments). The one place that maps
    a state to its shardings."""
    mesh_shape = dict(mesh.shape)

    def one(x: Any) -> NamedSharding:
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding") or (None,) * len(x.shape)
            return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh_shape))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
