"""Token selection from next-token logits: greedy, temperature and nucleus (top-p) sampling, plus stop strings.

Pure functions; the decode loop in `eval.generate` calls `select_tokens` inside its jitted step and `find_stop` on
the host after detokenizing.
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Masks to -inf every token outside the nucleus of each row.

    logits: float `[batch, vocab]`. The nucleus is the smallest set of most likely tokens whose total probability is
    >= top_p; the most likely token is always kept. Ties at the boundary are kept together (the cut is by value).
    Returns float `[batch, vocab]`.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability mass strictly before each sorted position: a token is in the nucleus if that mass is < top_p.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    in_nucleus = mass_before < top_p
    # The smallest logit still inside the nucleus is the per-row threshold.
    threshold = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def select_tokens(logits: jax.Array, key: jax.Array | None, params: SamplingParams) -> jax.Array:
    """Picks one token per row. logits: float `[batch, vocab]` -> int32 `[batch]`.

    `params` must be static under jit (it is hashable). `key` is unused (may be None) when greedy.
    """
    logits = logits.astype(jnp.float32)
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    scaled = top_p_filter(logits / params.temperature, params.top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
