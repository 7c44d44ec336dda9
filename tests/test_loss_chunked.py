"""The chunked cross-entropy (trainer.loss.chunked_loss_sums via the train step's forward) against the reference loss
on full logits: every sum (z-loss, loss weights, per-component) and the gradients of the objective, tied and untied
heads, on one device and on a data x fsdp x tensor mesh; and, structurally, that no `[rows, seq, vocab]` array exists
in the chunked program (forward or backward) while the reference program has one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ModelConfig
from models import sharding
from trainer import loss as loss_lib, state as state_lib, step as step_lib

B, S, V, CHUNK = 4, 16, 96, 4


def tiny(tied: bool) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=V, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=tied)


def batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seg = np.ones((B, S), np.int32)
    seg[:, 7:] = 2
    seg[1, -5:] = 0                                   # padding
    pos = np.where(seg == 2, np.arange(S) - 7, np.arange(S)).astype(np.int32)
    mask = (seg > 0) * rng.uniform(0.0, 2.0, (B, S))  # SFT-style weights, some near 0
    return dict(tokens=rng.integers(0, V, (B, S)).astype(np.int32), segment_ids=seg, positions=pos,
                loss_mask=mask.astype(np.float32), component=np.array([0, 1, 2, 1], np.int32))


def objective(graphdef, chunk, z_loss=1e-2):
    def fn(params, b):
        sums = step_lib._forward_sums(graphdef, params, b, 3, chunk)
        total = jnp.sum(loss_lib.target_weights(b["segment_ids"], b["loss_mask"]))
        return loss_lib.objective(sums, z_loss, total), sums
    return fn


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_reference_values_and_gradients(tied):
    config = tiny(tied)
    graphdef, params = nnx.split(state_lib.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    b = {k: jnp.asarray(v) for k, v in batch().items()}
    (ref, ref_sums), ref_grad = jax.jit(jax.value_and_grad(objective(graphdef, None), has_aux=True))(params, b)
    (got, sums), grad = jax.jit(jax.value_and_grad(objective(graphdef, CHUNK), has_aux=True))(params, b)
    assert float(ref_sums.z_loss) > 0 and np.asarray(ref_sums.per_component_weight).min() > 0
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    for a, r in zip(sums, ref_sums):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, r: np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7),
                 grad, ref_grad)


def _largest_logit_like_array(fn, *args) -> int:
    """Elements of the largest activation whose last axis is the vocabulary, over every (nested) jaxpr of fn."""
    biggest = 0

    def walk(jaxpr):
        nonlocal biggest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if len(shape) >= 3 and shape[-1] == V:  # activations, not the [embed, vocab] kernel
                    biggest = max(biggest, int(np.prod(shape)))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return biggest


def test_chunked_loss_never_builds_full_logits_or_their_gradient():
    config = tiny(False)
    graphdef, params = nnx.split(state_lib.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    b = {k: jnp.asarray(v) for k, v in batch().items()}
    grad = lambda chunk: jax.grad(lambda p: objective(graphdef, chunk)(p, b)[0])  # noqa: E731
    assert _largest_logit_like_array(grad(None), params) >= B * (S - 1) * V  # the reference: every predicting position
    assert _largest_logit_like_array(grad(CHUNK), params) == B * CHUNK * V   # one block at a time
    assert _largest_logit_like_array(grad(6), params) == B * 4 * V           # largest divisor of 16 up to 6


@pytest.mark.slow  # ~15 s: compiles a sharded step and a one-device step
def test_chunked_loss_on_a_mesh_matches_one_device():
    config = tiny(False)
    graphdef, params = nnx.split(state_lib.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    b = {k: jnp.asarray(v) for k, v in batch(1).items()}
    (ref, _), ref_grad = jax.jit(jax.value_and_grad(objective(graphdef, None), has_aux=True))(params, b)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.state_shardings(params, mesh)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, shardings)
        placed = jax.device_put(b, step_lib.batch_shardings(mesh, B))
        (got, _), grad = jax.jit(jax.value_and_grad(objective(graphdef, CHUNK), has_aux=True))(sharded, placed)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    jax.tree.map(lambda a, r: np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7),
                 grad, ref_grad)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_compute_sums_the_output_kernel_gradient_over_blocks_in_float32(tied):
    """With bf16 compute the chunked loss's output-kernel gradient is the unchunked one (one float32 product over all
    positions, rounded to bf16 once), not a bf16 running sum over blocks: 64 blocks of one position each, every
    element within one bf16 rounding of the reference (a bf16 running sum misses by several)."""
    config = dataclasses.replace(tiny(tied), compute_dtype="bfloat16")
    graphdef, params = nnx.split(state_lib.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(3)
    seq = 65  # 64 predicting positions
    b = dict(tokens=rng.integers(0, V, (B, seq)).astype(np.int32), segment_ids=np.ones((B, seq), np.int32),
             positions=np.tile(np.arange(seq, dtype=np.int32), (B, 1)), loss_mask=np.ones((B, seq), np.float32),
             component=np.array([0, 1, 2, 1], np.int32))
    b = {k: jnp.asarray(v) for k, v in b.items()}

    def kernel_grad(chunk):
        grad = jax.jit(jax.grad(lambda p: objective(graphdef, chunk, z_loss=0.0)(p, b)[0]))(params)
        leaf = grad["embed"]["embedding"] if tied else grad["lm_head"]["kernel"]
        return np.asarray(leaf[...], np.float64)

    ref, got = kernel_grad(None), kernel_grad(1)
    ulp = np.abs(ref) * 2.0 ** -8 + 1e-30        # one bf16 ulp is 2^-7 relative at worst; half of it at best
    assert np.max(np.abs(got - ref) / ulp) <= 1.0, np.max(np.abs(got - ref) / ulp)
