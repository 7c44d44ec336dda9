"""Process-local batches -> global `jax.Array`s sharded over the mesh's batch axis (no models/ import)."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, batch_spec: PartitionSpec = PartitionSpec("data")
                 ) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays with `jax.make_array_from_process_local_data`.

    local: this process's batch (`data.pipeline.build(config, process_index=jax.process_index(),
      process_count=jax.process_count())`), arrays [B_local, ...]; process p holds global rows
      [p * B_local, (p + 1) * B_local).
    batch_spec: a PartitionSpec with one entry, the mesh axis (or tuple of axes) that splits the batch dimension;
      trailing dimensions are replicated. Returns arrays [B_local * process_count, ...].
    """
    if len(batch_spec) != 1:
        raise ValueError(f"batch_spec must name only the batch dimension's mesh axes, got {batch_spec}")
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        sharding = NamedSharding(mesh, PartitionSpec(batch_spec[0], *([None] * (value.ndim - 1))))
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
