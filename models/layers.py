"""Parameter-holding building blocks: dense projections, RMSNorm, the gated MLP and the token embedding.

Every parameter carries logical axis names in its `out_sharding` metadata (resolved to mesh axes by
`models.sharding.RULES`). Variables are created with `eager_sharding=False`: placement is decided once, by
`models.sharding`, not at construction, so the same module builds on one device, on a mesh, or under `jax.eval_shape`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.config import ModelConfig


def make_param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    if len(names) != value.ndim:
        raise ValueError(f"logical axes {names} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], config: ModelConfig) -> nnx.Param:
    value = config.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return make_param(value.astype(config.param_dtype), names)


PROJECTION = "projection"  # the name of Dense outputs, for remat policies


@functools.cache
def projection(equation: str, out_dtype: jnp.dtype | None = None):
    """`einsum(equation, x, kernel, preferred_element_type=out_dtype)` whose backward is two plain einsums,
    `dx = einsum(g, kernel)` and `dkernel = einsum(x, g)` (cast to x's and the kernel's dtypes).

    Why not autodiff's own rule: JAX transposes a dot_general into a dot_general plus a transpose of its result, and
    XLA:CPU then lays the kernel gradient out by materialising a transposed copy of the larger activation gradient,
    fused into the elementwise op before it (in the MLP's backward, and a copy of the logits' gradient in the output
    layer). These einsums make neither copy (BENCHMARKS.md, "Where the SmolLM2 step's time goes"). They are the same
    products, and the TPU program compiles to the same collectives and peak memory.
    """
    inputs, out = equation.split("->")
    x_axes, kernel_axes = inputs.split(",")

    @jax.custom_vjp
    def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.einsum(equation, x, kernel, preferred_element_type=out_dtype)

    def forward(x, kernel):
        return project(x, kernel), (x, kernel)

    def backward(saved, g):
        x, kernel = saved
        return (jnp.einsum(f"{out},{kernel_axes}->{x_axes}", g, kernel).astype(x.dtype),
                jnp.einsum(f"{x_axes},{out}->{kernel_axes}", x, g).astype(kernel.dtype))

    project.defvjp(forward, backward)
    return project


class Dense(nnx.Module):
    """`y = einsum(equation, x, kernel) (+ bias)`; the bias covers the kernel's output axes (all but the first)."""

    def __init__(self, equation: str, shape: tuple[int, ...], names: tuple[str, ...], config: ModelConfig, *,
                 rngs: nnx.Rngs, bias: bool = False):
        self.equation = equation
        self.dtype = config.compute_dtype
        self.kernel = normal_param(rngs, shape, names, config)
        self.bias = make_param(jnp.zeros(shape[1:], config.param_dtype), names[1:]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = projection(self.equation)(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = checkpoint_name(y, PROJECTION)  # a custom_vjp hides its dot from remat's `checkpoint_dots` policy
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, normalised in float32 then scaled in the compute dtype (as transformers does)."""

    def __init__(self, size: int, config: ModelConfig, names: tuple[str, ...] = ("norm",)):
        self.eps = config.rms_norm_eps
        self.dtype = config.compute_dtype
        self.scale = make_param(jnp.ones((size,), config.param_dtype), names)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`, `[batch, seq, embed] -> [batch, seq, embed]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.gate_proj = Dense("bse,em->bsm", (e, m), ("embed", "mlp"), config, rngs=rngs)
        self.up_proj = Dense("bse,em->bsm", (e, m), ("embed", "mlp"), config, rngs=rngs)
        self.down_proj = Dense("bsm,me->bse", (m, e), ("mlp", "embed"), config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Embedding(nnx.Module):
    """Token embedding `[vocab, embed]`; also the output projection when embeddings are tied."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = config.compute_dtype
        self.embedding = normal_param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """`[batch, seq]` int -> `[batch, seq, embed]`."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
