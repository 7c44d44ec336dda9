"""Continuation log-probabilities with a shared prompt scored once.

A probe pair asks for log p(chosen | prompt) and log p(rejected | prompt): the prompt is the same, so it runs through
the model once, filling a KV cache, and each continuation is then run from that cache. Only the positions that
predict a continuation token are projected onto the vocabulary (no logits for the prompt). Prompts are left-padded, as
for generation (models.decode), so every row's last prompt token sits in the same cache slot; continuations are
right-padded after it with RoPE positions counting each row's own tokens. Prompt and continuation lengths are rounded
up to LENGTH_BUCKET per batch, so a probe set compiles a handful of shapes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.cache import KVCache

LENGTH_BUCKET = 16  # pad lengths up to a multiple of this, so few shapes are compiled


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def pack_prefix_batch(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], batch_size: int,
                      per_prompt: int, continuation_width: int) -> dict[str, np.ndarray]:
    """(prompt ids, [continuation ids, ...]) per row -> a fixed-shape batch:

    context, context_segments `[batch_size, Lp]` (left-padded, Lp a multiple of LENGTH_BUCKET; segment 0 = padding);
    continuations, continuation_segments `[per_prompt, batch_size, continuation_width]` (right-padded). Missing rows
    and continuations are all padding.
    """
    width = _bucket(max(len(prompt) for prompt, _ in groups))
    context = np.zeros((batch_size, width), np.int32)
    context_segments = np.zeros((batch_size, width), np.int32)
    continuations = np.zeros((per_prompt, batch_size, continuation_width), np.int32)
    continuation_segments = np.zeros((per_prompt, batch_size, continuation_width), np.int32)
    for row, (prompt, targets) in enumerate(groups):
        context[row, width - len(prompt):] = prompt
        context_segments[row, width - len(prompt):] = 1
        for k, target in enumerate(targets):
            continuations[k, row, : len(target)] = target
            continuation_segments[k, row, : len(target)] = 1
    return {"context": context, "context_segments": context_segments, "continuations": continuations,
            "continuation_segments": continuation_segments}


@functools.partial(jax.jit, static_argnums=0)
def _prefix_token_logprobs(graphdef: nnx.GraphDef, state: nnx.State, context: jax.Array,
                           context_segments: jax.Array, continuations: jax.Array,
                           continuation_segments: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    batch, width = context.shape
    cache = KVCache.zeros(model.config, batch, width + continuations.shape[-1])
    positions = jnp.maximum(jnp.cumsum(context_segments, axis=1) - 1, 0)
    prompt_hidden, cache = model.hidden(context, context_segments, positions, cache)
    start = jnp.sum(context_segments, axis=1, keepdims=True)
    kernel = model.output_kernel()
    out = []
    for tokens, segments in zip(continuations, continuation_segments):  # per_prompt is static: unrolled
        hidden, _ = model.hidden(tokens, segments, start + jnp.arange(tokens.shape[1]), cache)
        # The last prompt token predicts the first continuation token; continuation token t predicts t + 1.
        predictors = jnp.concatenate([prompt_hidden[:, -1:], hidden[:, :-1]], axis=1)
        logits = jnp.einsum("bse,ev->bsv", predictors, kernel, preferred_element_type=jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
        out.append(jnp.where(segments > 0, logp, 0.0))
    return jnp.stack(out)


def prefix_token_logprobs(model: nnx.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    """log p(continuation token | prompt, earlier continuation tokens) `[per_prompt, batch, width]` of a
    `pack_prefix_batch` batch; 0 on padding."""
    graphdef, state = nnx.split(model)
    return np.asarray(_prefix_token_logprobs(graphdef, state, *(jnp.asarray(batch[k]) for k in (
        "context", "context_segments", "continuations", "continuation_segments"))))


def continuation_scores(model: nnx.Module, max_len: int, encoded: Sequence[tuple[list[int], int]],
                        batch_size: int) -> np.ndarray:
    """Mean log-prob per continuation token of each encoded (prompt + continuation ids, prompt length)
    -> `[len(encoded)]` float64. Items with the same prompt ids share one prompt pass."""
    if not encoded:
        return np.zeros(0)
    longest = max(len(ids) for ids, _ in encoded)
    if longest > max_len:
        raise ValueError(f"a probe sequence has {longest} tokens, more than the model's {max_len} positions")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, n_context) in enumerate(encoded):
        if n_context < 1 or n_context >= len(ids):
            raise ValueError(f"item {i}: needs at least one prompt token and one continuation token")
        groups.setdefault(tuple(ids[:n_context]), []).append(i)
    longest_target = {p: max(len(encoded[i][0]) - len(p) for i in items) for p, items in groups.items()}
    # Batches of prompts in the same length bucket with similar continuation lengths: little padding, few shapes.
    prompts = sorted(groups, key=lambda p: (_bucket(len(p)), longest_target[p]))
    per_prompt = max(len(items) for items in groups.values())
    scores = np.zeros(len(encoded), np.float64)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        batch = pack_prefix_batch([(p, [encoded[i][0][len(p):] for i in groups[p]]) for p in chunk], batch_size,
                                  per_prompt, _bucket(max(longest_target[p] for p in chunk)))
        logp = prefix_token_logprobs(model, batch)
        means = logp.sum(-1) / batch["continuation_segments"].sum(-1).clip(min=1)
        for row, prompt in enumerate(chunk):
            for k, i in enumerate(groups[prompt]):
                scores[i] = means[k, row]
    return scores
