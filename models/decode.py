"""Batched KV-cached decoding primitives and greedy generation.

Prompts are left-padded to a common length so that every row writes the same cache slot at each step (one
`dynamic_update_slice` for the whole batch); padding slots carry segment id 0 and are never attended to, and each row's
RoPE positions count only its own tokens. Samplers (temperature, top-p, stop strings) build on `prefill` +
`decode_step`: both are pure functions of (model, arrays, cache) and can be jitted with `nnx.jit`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import xla_cpu
from models.cache import KVCache
from models.transformer import Transformer


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens, segment_ids), both int32 `[batch, max_prompt_len]`, left-padded (segment 0 = padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        segment_ids[row, width - len(prompt):] = 1
    return tokens, segment_ids


def init_cache(model: Transformer, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated), in the compute dtype."""
    return KVCache.zeros(model.config, batch, max_len)


def prefill(model: Transformer, tokens: jax.Array, segment_ids: jax.Array, cache: KVCache,
            ) -> tuple[jax.Array, jax.Array, KVCache]:
    """Runs left-padded prompts `[batch, prompt_len]` through the model, filling the cache.

    Returns (logits of each row's last prompt token `[batch, vocab]` float32, the next position per row `[batch]`,
    the cache).
    """
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    logits, cache = model.forward(tokens, segment_ids, positions, cache)
    return logits[:, -1], jnp.sum(segment_ids, axis=1).astype(jnp.int32), cache


def decode_step(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                ) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row (`tokens`, `positions`: `[batch]`) -> (next-token logits `[batch, vocab]`, cache)."""
    ones = jnp.ones_like(tokens)[:, None]
    logits, cache = model.forward(tokens[:, None], ones, positions[:, None], cache)
    return logits[:, 0], cache


def _greedy(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, segment_ids: jax.Array,
            eos_ids: jax.Array, pad_id: jax.Array, max_new_tokens: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    cache = init_cache(model, tokens.shape[0], tokens.shape[1] + max_new_tokens)
    logits, positions, cache = prefill(model, tokens, segment_ids, cache)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, positions, cache, done = carry
        logits, cache = decode_step(model, token, positions, cache)
        done = done | jnp.isin(token, eos_ids)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return (nxt, positions + 1, cache, done), nxt

    done = jnp.zeros(first.shape, bool)
    _, rest = jax.lax.scan(step, (first, positions, cache, done), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


_greedy_jit = xla_cpu.jit(_greedy, static_argnums=(0, 6))


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt, batched; each output stops after its first EOS (included).

    `eos_ids` defaults to the config's eos ids. Returns the new tokens only, one list per prompt.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    config = model.config
    eos = tuple(config.eos_token_ids if eos_ids is None else eos_ids)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    tokens, segment_ids = left_pad(prompts, pad_id)
    graphdef, state = nnx.split(model)
    out = np.asarray(_greedy_jit(graphdef, state, tokens, segment_ids, jnp.asarray(eos or (-1,), jnp.int32),
                                 jnp.asarray(pad_id, jnp.int32), max_new_tokens))
    results = []
    for row in out.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        results.append(row if stop is None else row[: stop + 1])
    return results
