"""Attention backends agree with the XLA reference: jax.nn.dot_product_attention (its XLA path on CPU) and the
Pallas splash kernel in interpret mode."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decode, hf_io, kernels, splash
from tests.test_models_util import build_hf, jax_logits, random_tokens

B, S, H, K, D = 2, 32, 4, 2, 16
SEGMENTS = np.array([[1] * 10 + [2] * 18 + [0] * 4, [1] * 32], np.int32)
REAL = SEGMENTS > 0


def _inputs():
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(*shape), jnp.float32) for shape in ((B, S, H, D), (B, S, K, D), (B, S, K, D)))
    index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return q, k, v, index


@pytest.mark.parametrize("window", [None, 5])
def test_kernels_agree_with_reference(window):
    q, k, v, index = _inputs()
    mask = kernels.AttentionMask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), index, index[0], window)
    reference = np.asarray(kernels.xla_attention(q, k, v, mask))
    np.testing.assert_allclose(np.asarray(kernels.dot_product_attention(q, k, v, mask)), reference, atol=1e-6)
    out = np.asarray(jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=True))(q, k, v))
    np.testing.assert_allclose(out[REAL], reference[REAL], rtol=0, atol=1e-5)  # padding rows are unspecified

    def loss(fn, q):
        return jnp.sum(jnp.where(REAL[:, :, None, None], fn(q, k, v, mask), 0.0) ** 2)

    grad_splash = jax.grad(lambda q: loss(lambda *a: splash.splash_attention(*a, interpret=True), q))(q)
    grad_reference = jax.grad(lambda q: loss(kernels.xla_attention, q))(q)
    np.testing.assert_allclose(np.asarray(grad_splash), np.asarray(grad_reference), rtol=0, atol=1e-4)


def test_splash_rejects_cached_shapes():
    q, k, v, index = _inputs()
    mask = kernels.AttentionMask(jnp.asarray(SEGMENTS[:, :1]), jnp.asarray(SEGMENTS), index[:, :1], index[0])
    with pytest.raises(NotImplementedError, match="uses the 'xla' kernel"):
        splash.splash_attention(q[:, :1], k, v, mask)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mistral")
    build_hf("mistral", out)
    return out


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_model_backends_match_xla(mistral_dir, backend):
    tokens = random_tokens(2, 12)
    segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 10 + [0] * 2], np.int32)
    reference = jax_logits(hf_io.load_pretrained(mistral_dir)[0], tokens, segment_ids)
    model, config = hf_io.load_pretrained(mistral_dir, attention=backend)
    assert config.attention == backend
    real = segment_ids > 0
    np.testing.assert_allclose(jax_logits(model, tokens, segment_ids)[real], reference[real], rtol=0, atol=1e-5)


def test_splash_model_decodes_with_xla_steps(mistral_dir):
    """Single-token cached steps dispatch to the XLA kernel, so a splash-configured model still generates."""
    prompt = random_tokens(1, 4)[0].tolist()
    splash_model, _ = hf_io.load_pretrained(mistral_dir, attention="splash")
    assert decode.generate(splash_model, [prompt], 3) == decode.generate(hf_io.load_pretrained(mistral_dir)[0],
                                                                          [prompt], 3)


def test_splash_on_a_mesh_matches_single_device(mistral_dir):
    """Under a mesh the kernel runs per shard (batch over data/fsdp, heads over tensor) inside shard_map."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from models import sharding

    tokens = random_tokens(4, 12)
    segment_ids = np.array([[1] * 5 + [2] * 7] * 4, np.int32)
    reference = jax_logits(hf_io.load_pretrained(mistral_dir)[0], tokens, segment_ids)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model, _ = hf_io.load_pretrained(mistral_dir, mesh=mesh, attention="splash")
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P(("data", "fsdp"), None))
        fn = nnx.jit(lambda m, t, s: m(t, s))
        got = np.asarray(fn(model, jax.device_put(tokens, rows), jax.device_put(segment_ids, rows)))
        assert "shard_map" in str(jax.make_jaxpr(lambda t, s: model(t, s))(tokens, segment_ids))
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
