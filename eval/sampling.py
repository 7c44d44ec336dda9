"""Token selection from next-token logits: greedy, temperature and nucleus (top-p) sampling, plus stop strings.

Pure functions; the decode loop in `eval.generate` calls `select_tokens` inside its jitted step (temperature, top-p
and PRNG key are per-row arrays, so one compiled step serves any mix of requests) and `find_stop` on the host after
detokenizing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy (argmax); `top_p` keeps the smallest set of most likely
    tokens whose probability reaches `top_p` (1.0 keeps all). `stop` strings end a row's text, which is cut before the
    first occurrence (the OpenAI convention)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks to -inf every token outside the nucleus of each row.

    logits: float `[batch, vocab]`; top_p: float `[batch]`. The nucleus is the smallest set of most likely tokens whose
    total probability is >= top_p; the most likely token is always kept, and top_p >= 1 keeps every token. Ties at the
    boundary are kept together (the cut is by value). Returns float `[batch, vocab]`.
    """
    top_p = jnp.asarray(top_p, jnp.float32)[:, None]
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability mass strictly before each sorted position: a token is in the nucleus if that mass is < top_p.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    in_nucleus = (mass_before < top_p) | (top_p >= 1.0)  # rounding must not cut the tail when top_p is 1
    # The smallest logit still inside the nucleus is the per-row threshold.
    threshold = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def select_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Picks one token per row: argmax where temperature is 0, else a sample from softmax(logits / temperature)
    restricted to the top-p nucleus.

    logits: float `[batch, vocab]`; keys: PRNG keys `[batch]` (one stream per row, so a row's samples do not depend on
    the other rows in the batch); temperature, top_p: float `[batch]`. Returns int32 `[batch]`.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample() -> jax.Array:
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        # Sorting the vocabulary is the costly part of sampling: only done when some row asks for top-p < 1.
        scaled = jax.lax.cond(jnp.any(top_p < 1.0), lambda: top_p_filter(scaled, top_p), lambda: scaled)
        sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
