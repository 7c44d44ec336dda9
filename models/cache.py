"""The KV cache carried through cached forward passes (see models.decode for the primitives that use it)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v `[layers, batch, max_len, kv_heads, head_dim]`; segment_ids `[batch, max_len]` (0 = empty or padding slot);
    index: int32 scalar, the next slot to write (all rows write the same slot, so prompts are left-padded)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]
