"""Grouped-query self-attention with RoPE, optional q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3) and a KV cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import kernels
from models.config import ModelConfig
from models.layers import Dense, RMSNorm
from models.rope import apply_rope, inv_frequencies


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        bias = config.qkv_bias
        self.q_proj = Dense("bse,ehd->bshd", (e, h, d), ("embed", "q_heads", "head_dim"), config, rngs=rngs, bias=bias)
        self.k_proj = Dense("bse,ekd->bskd", (e, k, d), ("embed", "kv_heads", "head_dim"), config, rngs=rngs, bias=bias)
        self.v_proj = Dense("bse,ekd->bskd", (e, k, d), ("embed", "kv_heads", "head_dim"), config, rngs=rngs, bias=bias)
        self.o_proj = Dense("bshd,hde->bse", (h, d, e), ("q_heads", "head_dim", "embed"), config, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config, names=("head_dim",))
            self.k_norm = RMSNorm(d, config, names=("head_dim",))

    def __call__(self, x: jax.Array, positions: jax.Array, mask: kernels.AttentionMask,
                 kv: tuple[jax.Array, jax.Array] | None = None, write_index: jax.Array | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x `[batch, seq, embed]`, positions `[batch, seq]` -> (`[batch, seq, embed]`, updated kv).

        With `kv` (cache arrays `[batch, max_len, kv_heads, head_dim]`), this step's keys/values are written at slot
        `write_index` and attention runs over the whole cache; `mask` must then describe the cache slots.
        """
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inv_frequencies(self.config)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            start = (0, write_index, 0, 0)
            kv = (jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start),
                  jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start))
            k, v = kv[0].astype(q.dtype), kv[1].astype(q.dtype)
        out = kernels.attend(q, k, v, mask, self.config.attention, self.config.splash_interpret)
        return self.o_proj(out), kv
