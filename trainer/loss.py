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

from models import sharding


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


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[..., V]` logits and `[...]` target ids -> (cross-entropy, logsumexp), both float32 `[...]`."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - target, lse


def _sums(row_loss: jax.Array, row_weight: jax.Array, z_loss: jax.Array, component: jax.Array,
          num_components: int) -> LossSums:
    onehot = jax.nn.one_hot(component, num_components, dtype=jnp.float32)  # [B, C]
    return LossSums(loss=jnp.sum(row_loss), z_loss=z_loss, weight=jnp.sum(row_weight),
                    per_component_loss=row_loss @ onehot, per_component_weight=row_weight @ onehot)


def predicting_loss_sums(logits: jax.Array, batch: dict[str, jax.Array], num_components: int) -> LossSums:
    """Weighted next-token loss sums of one batch (keys tokens, segment_ids, loss_mask, component; see design.md)
    from the `[B, S-1, V]` logits of the positions that predict a token (0 .. S-2): the last position predicts
    nothing. A caller projects only those positions (hidden states `[:, :-1]`), since slicing the `[B, S, V]` float32
    logits afterwards costs a copy of them and of their gradient."""
    weights = target_weights(batch["segment_ids"], batch["loss_mask"])
    ce, lse = _cross_entropy(logits, batch["tokens"][:, 1:])
    return _sums(jnp.sum(weights * ce, axis=1), jnp.sum(weights, axis=1), jnp.sum(weights * lse * lse),
                 batch["component"], num_components)


@jax.custom_vjp
def _block_logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """`[B, c, E]` hidden states and the float32 `[E, V]` kernel -> float32 logits `[B, c, V]`, the product computed
    in h's dtype. The backward is `layers.projection`'s, except that the kernel's gradient stays float32 (the
    float32 product of the block, not rounded to the compute dtype) so that blocks are summed in float32."""
    return jnp.einsum("bse,ev->bsv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)


def _block_logits_forward(h, kernel):
    return _block_logits(h, kernel), (h, kernel)


def _block_logits_backward(saved, g):
    h, kernel = saved
    return (jnp.einsum("bsv,ev->bse", g, kernel.astype(h.dtype)).astype(h.dtype),
            jnp.einsum("bse,bsv->ev", h, g).astype(kernel.dtype))


_block_logits.defvjp(_block_logits_forward, _block_logits_backward)


def chunked_loss_sums(hidden: jax.Array, output_kernel: jax.Array, batch: dict[str, jax.Array],
                      num_components: int, chunk: int) -> LossSums:
    """`predicting_loss_sums` of the logits `hidden @ output_kernel`, computed `chunk` sequence positions at a time.

    hidden `[B, S, E]`, output_kernel `[E, V]`; blocks are the largest divisor of S that is at most `chunk` positions
    (S itself when `chunk >= S`). Only one `[B, block, V]` float32 block of logits
    exists at a time, forward and backward: the chunk body is rematerialised (`jax.checkpoint`) inside a
    `jax.lax.scan`, so its gradient is also computed one block at a time. The products are computed in hidden's
    (compute) dtype, and the kernel's gradient is summed across blocks in float32, then cast to output_kernel's dtype
    once: the same rounding as the one product over all positions that the unchunked loss makes (a bf16 running sum
    would round once per block). The sums equal `predicting_loss_sums` of
    `einsum(hidden[:, :-1], output_kernel)` up to float summation order.
    """
    batch_size, seq, _ = hidden.shape
    chunk = max(d for d in range(1, min(chunk, seq) + 1) if seq % d == 0)
    # Position t predicts tokens[t+1]; the last position predicts nothing (weight 0, any valid target id).
    weights = jnp.pad(target_weights(batch["segment_ids"], batch["loss_mask"]), ((0, 0), (0, 1)))
    targets = jnp.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1)))

    def blocks(x: jax.Array) -> jax.Array:  # [B, S, ...] -> [S / chunk, B, chunk, ...]
        x = x.reshape(batch_size, seq // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))

    kernel = output_kernel.astype(jnp.float32)  # the scan sums each block's kernel gradient in this dtype

    @jax.checkpoint
    def block(carry, xs):
        row_loss, z_loss = carry
        h, target, weight = xs
        logits = _block_logits(h, kernel)
        ce, lse = _cross_entropy(sharding.constrain(logits, ("act_batch", "act_seq", "act_vocab")), target)
        return (row_loss + jnp.sum(weight * ce, axis=1), z_loss + jnp.sum(weight * lse * lse)), None

    zeros = (jnp.zeros((batch_size,), jnp.float32), jnp.zeros((), jnp.float32))
    (row_loss, z_loss), _ = jax.lax.scan(block, zeros, (blocks(hidden), blocks(targets), blocks(weights)))
    return _sums(row_loss, jnp.sum(weights, axis=1), z_loss, batch["component"], num_components)


def objective(sums: LossSums, z_loss_coeff: float, total_weight: jax.Array) -> jax.Array:
    """The scalar that is differentiated: (CE sum + z_loss_coeff * z sum) / total weight of the whole global batch.

    `total_weight` is computed before the forward pass (it depends only on the batch), so microbatches and shards
    each contribute their share of the same mean.
    """
    return (sums.loss + z_loss_coeff * sums.z_loss) / jnp.maximum(total_weight, 1.0)


def mean_loss(sums: LossSums) -> jax.Array:
    """Mean cross-entropy per weighted target token (the reported loss)."""
    return sums.loss / jnp.maximum(sums.weight, 1.0)
