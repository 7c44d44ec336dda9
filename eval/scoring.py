"""Continuation log-probabilities: probes packed several to a row, each shared prompt run once.

A probe pair asks for log p(chosen | prompt) and log p(rejected | prompt). Items are grouped by prompt, and groups are
packed into rows (first fit, longest continuations first), each group one segment of its row. A row's prompts run
through the model once, filling a KV cache; pass k then runs the k-th continuation of every group in the row from that
cache. The segment mask keeps each continuation to its own prompt and its own earlier tokens, and RoPE positions count
each item's own tokens, so packing changes no score. Only the positions that predict a continuation token are
projected onto the vocabulary. Packing keeps padding low (short probes would otherwise each pad to a row of their
own) and the matrix products large. Widths are rounded to LENGTH_BUCKET and the rows spread evenly over the fewest
calls of at most `batch_size` rows, so a probe set compiles one shape.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.cache import KVCache

LENGTH_BUCKET = 16  # pad widths up to a multiple of this, so few shapes are compiled
ROW_WIDTH = 128     # continuation slots per row (at least): room for several short probes

Group = tuple[Sequence[int], Sequence[Sequence[int]]]  # (prompt ids, [continuation ids, ...])


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def row_widths(groups: Sequence[Group], window: int | None = None) -> tuple[int, int]:
    """(prompt slots, continuation slots) per row: continuations get ROW_WIDTH slots (or the longest continuation),
    prompts a share in proportion to their total length, so that both fill up alike.

    A packed probe sits further from its prompt in slots than in positions; with a sliding window `window` the mask
    counts slots, so rows are kept within the window (exact) or a ValueError says why they cannot be.
    """
    longest_prompt = max(len(prompt) for prompt, _ in groups)
    longest_target = max(len(t) for _, targets in groups for t in targets)
    continuation_width = _bucket(max(ROW_WIDTH, longest_target))
    prompt_total = sum(len(prompt) for prompt, _ in groups)
    target_total = sum(max(len(t) for t in targets) for _, targets in groups)
    prompt_width = _bucket(max(longest_prompt, math.ceil(continuation_width * prompt_total / target_total)))
    if window is not None and prompt_width + continuation_width > window:
        prompt_width = _bucket(longest_prompt)
        continuation_width = max(_bucket(longest_target), (window - prompt_width) // LENGTH_BUCKET * LENGTH_BUCKET)
        if prompt_width + continuation_width > window:
            raise ValueError(f"a probe needs {prompt_width} + {continuation_width} slots (prompt + continuation, "
                             f"rounded up to {LENGTH_BUCKET}), more than the model's sliding window of {window}")
    return prompt_width, continuation_width


def plan_rows(groups: Sequence[Group], prompt_width: int, continuation_width: int) -> list[list[int]]:
    """Group indices per row, first fit in order of decreasing longest continuation: each row's prompts fit in
    `prompt_width` slots and, for every k, its groups' k-th continuations in `continuation_width` slots."""
    passes = max(len(targets) for _, targets in groups)
    capacity = np.array([prompt_width] + [continuation_width] * passes)
    need = np.zeros((len(groups), passes + 1), np.int64)
    for g, (prompt, targets) in enumerate(groups):
        need[g, : len(targets) + 1] = [len(prompt), *(len(t) for t in targets)]
    if (need > capacity).any():
        raise ValueError(f"a probe is longer than a row ({prompt_width} prompt, {continuation_width} continuation "
                         f"slots)")
    rows: list[list[int]] = []
    used = np.zeros((0, passes + 1), np.int64)
    for g in sorted(range(len(groups)), key=lambda g: (-need[g, 1:].max(), -need[g, 0])):
        fits = np.flatnonzero((used + need[g] <= capacity).all(axis=1))
        if fits.size:
            rows[fits[0]].append(g)
            used[fits[0]] += need[g]
        else:
            rows.append([g])
            used = np.concatenate([used, need[g][None]])
    return rows


def pack_rows(groups: Sequence[Group], rows: Sequence[Sequence[int]], num_rows: int, prompt_width: int,
              continuation_width: int, passes: int) -> dict[str, np.ndarray]:
    """The groups of `rows` (indices into `groups`) as one fixed-shape batch of `num_rows` rows (the rest padding):

    context, context_segments, context_positions `[num_rows, prompt_width]`: the row's prompts one after another,
    group j of a row in segment j + 1 (0 = padding), positions from 0 per prompt;
    continuations, continuation_segments, continuation_positions `[passes, num_rows, continuation_width]`: pass k
    holds each group's k-th continuation in its group's segment, positions continuing its prompt's;
    sources `[passes, num_rows, continuation_width]`: for each continuation token, the slot whose hidden state
    predicts it in the row's [prompt slots, this pass's slots] (the prompt's last token for the first one).
    """
    shape = (passes, num_rows, continuation_width)
    batch = {name: np.zeros((num_rows, prompt_width), np.int32)
             for name in ("context", "context_segments", "context_positions")}
    batch.update({name: np.zeros(shape, np.int32) for name in (
        "continuations", "continuation_segments", "continuation_positions", "sources")})
    for row, members in enumerate(rows):
        at, continuation_at = 0, [0] * passes
        for segment, g in enumerate(members, start=1):
            prompt, targets = groups[g]
            span = slice(at, at + len(prompt))
            batch["context"][row, span] = prompt
            batch["context_segments"][row, span] = segment
            batch["context_positions"][row, span] = np.arange(len(prompt))
            for k, target in enumerate(targets):
                start, n = continuation_at[k], len(target)
                span = (k, row, slice(start, start + n))
                batch["continuations"][span] = target
                batch["continuation_segments"][span] = segment
                batch["continuation_positions"][span] = len(prompt) + np.arange(n)
                batch["sources"][span] = [at + len(prompt) - 1, *(prompt_width + np.arange(start, start + n - 1))]
                continuation_at[k] += n
            at += len(prompt)
    return batch


_INPUTS = ("context", "context_segments", "context_positions", "continuations", "continuation_segments",
           "continuation_positions", "sources")


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef: nnx.GraphDef, state: nnx.State, context: jax.Array, context_segments: jax.Array,
                    context_positions: jax.Array, continuations: jax.Array, continuation_segments: jax.Array,
                    continuation_positions: jax.Array, sources: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    rows, width = context.shape
    cache = KVCache.zeros(model.config, rows, width + continuations.shape[-1])
    prompt_hidden, cache = model.hidden(context, context_segments, context_positions, cache)
    kernel = model.output_kernel()
    out = []
    for tokens, segments, positions, source in zip(continuations, continuation_segments, continuation_positions,
                                                   sources):  # the number of passes is static: unrolled
        hidden, _ = model.hidden(tokens, segments, positions, cache)
        predictors = jnp.take_along_axis(jnp.concatenate([prompt_hidden, hidden], axis=1), source[..., None], axis=1)
        logits = jnp.einsum("bse,ev->bsv", predictors, kernel, preferred_element_type=jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
        out.append(jnp.where(segments > 0, logp, 0.0))
    return jnp.stack(out)


def token_logprobs(model: nnx.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    """log p(continuation token | its prompt, its earlier tokens) `[passes, num_rows, continuation_width]` of a
    `pack_rows` batch; 0 on padding."""
    graphdef, state = nnx.split(model)
    return np.asarray(_token_logprobs(graphdef, state, *(jnp.asarray(batch[k]) for k in _INPUTS)))


def global_token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, np.ndarray],
                          mesh: jax.sharding.Mesh) -> np.ndarray:
    """`token_logprobs` of the model `nnx.merge(graphdef, params)` whose parameters are global arrays on `mesh`
    (a training state's, on every process of a pod). Every process passes the same `batch`; it is replicated on the
    mesh, every process takes part in the computation and gets the whole result."""
    from jax.experimental import multihost_utils

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    inputs = [jax.make_array_from_callback(batch[k].shape, replicated, lambda index, a=batch[k]: a[index])
              for k in _INPUTS]
    return np.asarray(multihost_utils.process_allgather(_token_logprobs(graphdef, params, *inputs), tiled=True))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Encoded items packed into calls of one shape. `batches`: the `pack_rows` batch of each call; `rows`: per call,
    the group indices of each row; `members`: per group, the indices of its items (in the encoded list)."""
    batches: list[dict[str, np.ndarray]]
    rows: list[list[list[int]]]
    members: list[list[int]]
    num_items: int

    def scores(self, logps: Sequence[np.ndarray]) -> np.ndarray:
        """Mean log-prob per continuation token of each item `[num_items]` float64, from the `token_logprobs` of
        every call, in order."""
        scores = np.zeros(self.num_items, np.float64)
        for batch, call, logp in zip(self.batches, self.rows, logps, strict=True):
            # Sum each continuation's slots: segment ids tell continuations apart within a pass's row.
            for row, group_ids in enumerate(call):
                for segment, g in enumerate(group_ids, start=1):
                    for k, i in enumerate(self.members[g]):
                        mine = batch["continuation_segments"][k, row] == segment
                        scores[i] = logp[k, row, mine].sum() / mine.sum()
        return scores


def plan(encoded: Sequence[tuple[list[int], int]], max_len: int, batch_size: int, window: int | None = None) -> Plan:
    """Packs encoded (prompt + continuation ids, prompt length) items: items with the same prompt ids share one
    prompt pass; at most `batch_size` rows (each packing several items) per call, every call the same shape.
    `max_len`: the model's positions; `window`: its sliding window, if any."""
    if not encoded:
        raise ValueError("no items to score")
    longest = max(len(ids) for ids, _ in encoded)
    if longest > max_len:
        raise ValueError(f"a probe sequence has {longest} tokens, more than the model's {max_len} positions")
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, n_context) in enumerate(encoded):
        if n_context < 1 or n_context >= len(ids):
            raise ValueError(f"item {i}: needs at least one prompt token and one continuation token")
        by_prompt.setdefault(tuple(ids[:n_context]), []).append(i)
    members = list(by_prompt.values())
    groups = [(p, [encoded[i][0][len(p):] for i in items]) for p, items in by_prompt.items()]
    prompt_width, continuation_width = row_widths(groups, window)
    rows = plan_rows(groups, prompt_width, continuation_width)
    passes = max(len(items) for items in members)
    num_rows = -(-len(rows) // -(-len(rows) // batch_size))  # the fewest calls, rows spread evenly: one shape
    calls = [rows[start: start + num_rows] for start in range(0, len(rows), num_rows)]
    return Plan([pack_rows(groups, call, num_rows, prompt_width, continuation_width, passes) for call in calls],
                calls, members, len(encoded))


def continuation_scores(model: nnx.Module, max_len: int, encoded: Sequence[tuple[list[int], int]],
                        batch_size: int) -> np.ndarray:
    """Mean log-prob per continuation token of each encoded (prompt + continuation ids, prompt length)
    -> `[len(encoded)]` float64 (`plan`, then one `token_logprobs` per call)."""
    if not encoded:
        return np.zeros(0)
    packed = plan(encoded, max_len, batch_size, model.config.sliding_window)
    return packed.scores([token_logprobs(model, batch) for batch in packed.batches])
