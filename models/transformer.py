"""The decoder-only Transformer (Llama / Qwen2 / Qwen3 / Mistral) as one Flax NNX module.

Layers are either a `nnx.List` of blocks (`scan_layers=False`) or one block whose parameters are stacked on a leading
`layers` axis and run with `jax.lax.scan` (`scan_layers=True`). Both layouts run the same block function (optionally
wrapped in `jax.checkpoint`), so they give identical outputs; `models.layout` converts parameter trees between them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import sharding
from models.attention import Attention
from models.cache import KVCache
from models.config import ModelConfig
from models.kernels import AttentionMask
from models.layers import PROJECTION, Dense, Embedding, MLP, RMSNorm, projection

ACTIVATION = ("act_batch", "act_seq", "act_embed")
# save_dots: every matmul output, i.e. the Dense projections (named, being custom_vjp) and attention's dots.
REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots, jax.checkpoint_policies.save_only_these_names(PROJECTION))}


class Block(nnx.Module):
    """Pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask,
                 kv: tuple[jax.Array, jax.Array] | None = None, write_index: jax.Array | None = None):
        x = sharding.constrain(x, ACTIVATION)
        attn_out, kv = self.attn(self.attn_norm(x), positions, mask, kv, write_index)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return sharding.constrain(x, ACTIVATION), kv


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs)

    return create(rngs)


def default_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its segment `[batch, seq]` (restarting at 0 where the segment id changes)."""
    seq = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embedding(config, rngs=rngs)
        if config.scan_layers:
            self.layers = _stacked_blocks(config, rngs)
        else:
            self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config)
        if not config.tie_embeddings:
            self.lm_head = Dense("bse,ev->bsv", (config.hidden_size, config.vocab_size), ("embed", "vocab"), config,
                                 rngs=rngs)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """tokens, segment_ids, positions `[batch, seq]` int -> logits `[batch, seq, vocab]` float32.

        Attention is causal within a segment and never crosses segments; segment 0 is padding (its logits are
        meaningless). Defaults: one segment per row; positions restart at 0 in each segment.
        """
        logits, _ = self.forward(tokens, segment_ids, positions)
        return logits

    def forward(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Like `__call__`; with a `cache`, the tokens fill slots `cache.index ...` and attend to all earlier slots.

        Returns (logits `[batch, seq, vocab]` float32, the updated cache or None).
        """
        x, cache = self.hidden(tokens, segment_ids, positions, cache)
        return self.logits(x), cache

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """The final-normed hidden states `[batch, seq, embed]` (compute dtype) that `logits` projects, and the cache.

        A caller that never needs all logits at once (the chunked training loss) projects slices of these itself with
        `output_kernel()`.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        batch, seq = tokens.shape
        segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        positions = default_positions(segment_ids) if positions is None else jnp.asarray(positions, jnp.int32)
        q_index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if cache is None:
            mask = AttentionMask(segment_ids, segment_ids, q_index, q_index[0], self.config.sliding_window)
        else:
            kv_segment = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
            kv_index = jnp.arange(cache.max_len, dtype=jnp.int32)
            mask = AttentionMask(segment_ids, kv_segment, q_index + cache.index, kv_index, self.config.sliding_window)
        x = sharding.constrain(self.embed(tokens), ACTIVATION)
        x, kv = self._run_layers(x, positions, mask, cache)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], segment_ids=mask.kv_segment, index=cache.index + seq)
        return self.final_norm(x), cache

    def output_kernel(self) -> jax.Array:
        """The output projection `[embed, vocab]` in the compute dtype (the transposed embedding when tied)."""
        if self.config.tie_embeddings:
            return self.embed.embedding[...].astype(self.config.compute_dtype).T
        return self.lm_head.kernel[...].astype(self.config.compute_dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        """Hidden states `[batch, seq, embed]` -> logits `[batch, seq, vocab]` float32."""
        logits = projection("bse,ev->bsv", jnp.float32)(x, self.output_kernel())
        return sharding.constrain(logits, ("act_batch", "act_seq", "act_vocab"))

    def _run_layers(self, x, positions, mask, cache):
        config = self.config
        graphdef, _ = nnx.split(self.layers if config.scan_layers else self.layers[0])

        def block_fn(x, layer_state, kv):
            return nnx.merge(graphdef, layer_state)(x, positions, mask, kv, None if cache is None else cache.index)

        if config.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[config.remat],
                                      prevent_cse=not config.scan_layers)
        kv_all = None if cache is None else (cache.k, cache.v)
        if config.scan_layers:
            def step(x, xs):
                layer_state, kv = xs
                x, kv = block_fn(x, layer_state, kv)
                return x, kv

            return jax.lax.scan(step, x, (nnx.state(self.layers), kv_all))
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = block_fn(x, nnx.state(layer), None if kv_all is None else (kv_all[0][i], kv_all[1][i]))
            new_kv.append(kv)
        if cache is None:
            return x, None
        return x, (jnp.stack([k for k, _ in new_kv]), jnp.stack([v for _, v in new_kv]))
