"""Attention backends behind one signature: the XLA reference, `jax.nn.dot_product_attention`, and TPU splash attention.

Every backend computes softmax(q k^T / sqrt(head_dim) + mask) v with the same mask: causal by slot index, never across
segments, never onto padding (segment 0), optionally limited to a sliding window of `window` slots (HF Mistral:
key visible iff q_index - kv_index < window).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows (padding queries) stay NaN-free


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_segment", "kv_segment", "q_index", "kv_index"], meta_fields=["window"])
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Who may attend to whom. Shapes: q_segment `[batch, q_len]`, kv_segment `[batch, kv_len]`, q_index `[batch, q_len]`,
    kv_index `[kv_len]` (slot numbers: the causal order)."""

    q_segment: jax.Array
    kv_segment: jax.Array
    q_index: jax.Array
    kv_index: jax.Array
    window: int | None = None

    def dense(self) -> jax.Array:
        """Boolean mask `[batch, q_len, kv_len]`, True where attention is allowed."""
        q_idx, kv_idx = self.q_index[:, :, None], self.kv_index[None, None, :]
        allowed = (kv_idx <= q_idx) & (self.q_segment[:, :, None] == self.kv_segment[:, None, :])
        allowed &= self.kv_segment[:, None, :] != 0
        if self.window is not None:
            allowed &= q_idx - kv_idx < self.window
        return allowed


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Reference einsum/softmax attention with grouped-query heads.

    q `[batch, q_len, heads, head_dim]`, k/v `[batch, kv_len, kv_heads, head_dim]` -> `[batch, q_len, heads, head_dim]`.
    Scores and softmax are float32; probabilities are cast to v.dtype before the value product (as transformers does).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    scores = jnp.where(mask.dense()[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                          implementation: str | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention`; `implementation` 'cudnn' (GPU, bf16/fp16 only) runs cuDNN flash attention with
    the mask as a bias, None runs the function's XLA path."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None, :, :], implementation=implementation)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, backend: str,
           splash_interpret: bool | None = None) -> jax.Array:
    """Dispatches to the backend named by `ModelConfig.attention` (`splash_interpret`: see ModelConfig)."""
    if backend == "xla":
        return xla_attention(q, k, v, mask)
    if backend == "cudnn":
        return dot_product_attention(q, k, v, mask, "cudnn" if jax.default_backend() == "gpu" else None)
    if backend == "splash":
        if q.shape[1] != k.shape[1]:  # cached decoding: splash covers full sequences only
            return xla_attention(q, k, v, mask)
        from models import splash

        return splash.splash_attention(q, k, v, mask, interpret=splash_interpret)
    raise ValueError(f"unknown attention backend {backend!r}")
