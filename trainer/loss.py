"""Next-token cross-entropy with the loss mask, per-component sums and optional z-loss, all in float32.

The contract (docs/design.md): logits at t predict `tokens[t+1]`, weighted by
`loss_mask[t+1] * (segment_ids[t+1] == segment_ids[t]) * (segment_ids[t+1] > 0)`, so no target crosses a document
boundary. Functions return *sums* and the total weight rather than means, so gradient accumulation over microbatches
and sharding give exactly the mean over the whole batch (divide once, at the end).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossSums(NamedTuple):
    """Weighted sums over a batch; `per_component_*` are `[num_components]`."""
    loss: jax.Array            # sum of weight * cross-entropy
    z_loss: jax.Array          # sum of weight * logsumexp^2 (unscaled)
    weight: jax.Array          # sum of weights (the denominator)
    per_component_loss: jax.Array
    per_component_weight: jax.Array


def zero_sums(num_components: int) -> LossSums:
    zero = jnp.zeros((), jnp.float32)
    return LossSums(zero, zero, zero, jnp.zeros((num_components,), jnp.float32),
                    jnp.zeros((num_components,), jnp.float32))


def target_weights(segment_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """`[B, S]` segment ids and loss mask -> `[B, S-1]` weight of the prediction made at t for tokens[t+1]."""
    nxt = segment_ids[:, 1:]
    same_doc = (nxt == segment_ids[:, :-1]) & (nxt > 0)
    return loss_mask[:, 1:].astype(jnp.float32) * same_doc.astype(jnp.float32)


def token_losses(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[B, S, V]` logits and `[B, S]` tokens -> (`[B, S-1]` cross-entropy of tokens[t+1], `[B, S-1]` logsumexp)."""
    logits = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - target, lse


def loss_sums(logits: jax.Array, batch: dict[str, jax.Array], num_components: int) -> LossSums:
    """Weighted next-token loss sums of one batch (keys tokens, segment_ids, loss_mask, component; see design.md)."""
    weights = target_weights(batch["segment_ids"], batch["loss_mask"])
    ce, lse = token_losses(logits, batch["tokens"])
    row_loss = jnp.sum(weights * ce, axis=1)                               # [B]
    row_weight = jnp.sum(weights, axis=1)                                  # [B]
    onehot = jax.nn.one_hot(batch["component"], num_components, dtype=jnp.float32)  # [B, C]
    return LossSums(
        loss=jnp.sum(row_loss),
        z_loss=jnp.sum(weights * lse * lse),
        weight=jnp.sum(row_weight),
        per_component_loss=row_loss @ onehot,
        per_component_weight=row_weight @ onehot,
    )


def objective(sums: LossSums, z_loss_coeff: float, total_weight: jax.Array) -> jax.Array:
    """The scalar that is differentiated: (CE sum + z_loss_coeff * z sum) / total weight of the whole global batch.

    `total_weight` is computed before the forward pass (it depends only on the batch), so microbatches and shards
    each contribute their share of the same mean.
    """
    return (sums.loss + z_loss_coeff * sums.z_loss) / jnp.maximum(total_weight, 1.0)


def mean_loss(sums: LossSums) -> jax.Array:
    """Mean cross-entropy per weighted target token (the reported loss)."""
    return sums.loss / jnp.maximum(sums.weight, 1.0)
