"""Forward-pass properties: layouts and remat agree, layout conversion, packing, precision."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import hf_io, kernels, layers, layout, transformer
from tests.test_models_util import build_hf, jax_logits, random_tokens


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """Mistral with a 5-token sliding window and random norms: exercises the window inside packed rows."""
    out = tmp_path_factory.mktemp("mistral")
    build_hf("mistral", out)
    return out


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@nnx.jit
def _logits_and_grads(model, tokens):
    def loss(m):
        logits = m(tokens)
        return jnp.mean(logits ** 2), logits

    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, nnx.to_pure_dict(grads)


def test_scan_unrolled_and_remat_agree(mistral_dir):
    tokens = random_tokens(2, 12)
    want_logits, want_grads = _logits_and_grads(hf_io.load_pretrained(mistral_dir, scan_layers=True)[0], tokens)
    for scan, remat in [(False, "none"), (True, "full"), (False, "save_dots")]:
        model, cfg = hf_io.load_pretrained(mistral_dir, scan_layers=scan, remat=remat)
        logits, grads = _logits_and_grads(model, tokens)
        np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-6)
        grads = layout.to_stacked(grads, cfg)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), grads, want_grads)


def test_layout_round_trip_params_and_adam_moments(mistral_dir):
    stacked_model, stacked_cfg = hf_io.load_pretrained(mistral_dir, scan_layers=True)
    unrolled_model, unrolled_cfg = hf_io.load_pretrained(mistral_dir, scan_layers=False)
    unrolled = _params(unrolled_model)
    as_stacked = layout.to_stacked(unrolled, unrolled_cfg)
    jax.tree.map(np.testing.assert_array_equal, as_stacked, _params(stacked_model))
    jax.tree.map(np.testing.assert_array_equal, layout.from_stacked(as_stacked, unrolled_cfg), unrolled)
    assert layout.to_stacked(as_stacked, stacked_cfg) is as_stacked
    # Adam moments have the parameters' shapes; an unrolled optimizer state converts the same way.
    optimizer = nnx.Optimizer(unrolled_model, optax.adam(1e-3), wrt=nnx.Param)
    mu = nnx.to_pure_dict(optimizer.opt_state[0].mu)
    stacked_mu = layout.to_stacked(mu, unrolled_cfg)
    assert stacked_mu["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)
    # abstract trees (restore targets) convert too
    abstract = jax.eval_shape(lambda: as_stacked)
    assert layout.from_stacked(abstract, unrolled_cfg)["layers"][1]["mlp"]["up_proj"]["kernel"].shape == (64, 128)
    with pytest.raises(ValueError, match="already stacked"):
        layout.to_stacked(as_stacked, unrolled_cfg)
    with pytest.raises(ValueError, match="already unrolled"):
        layout.from_stacked(unrolled, unrolled_cfg)


def test_packed_documents_equal_documents_alone(mistral_dir):
    model, _ = hf_io.load_pretrained(mistral_dir)
    doc_a, doc_b = random_tokens(1, 7, seed=3)[0], random_tokens(1, 9, seed=4)[0]
    pad = lambda x: np.pad(x, (0, 20 - len(x)))  # noqa: E731  (trailing padding cannot affect earlier tokens)
    packed = pad(np.concatenate([doc_a, doc_b]))
    rows = np.stack([packed, pad(doc_a), pad(doc_b), packed])
    segment_ids = np.stack([pad(np.array([1] * 7 + [2] * 9)), pad(np.ones(7, int)), pad(np.ones(9, int)),
                            pad(np.ones(16, int))]).astype(np.int32)
    logits = jax_logits(model, rows, segment_ids)  # positions default to restarting per segment
    np.testing.assert_allclose(logits[0, :7], logits[1, :7], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits[0, 7:16], logits[2, :9], rtol=0, atol=1e-5)
    assert np.isfinite(logits).all()  # padding rows are fully masked but stay finite
    # as one segment, the second document would see the first: the packing mask is what makes them equal
    assert np.abs(logits[3, 7:16] - logits[2, :9]).max() > 1e-3


@pytest.mark.parametrize("param_dtype,compute_dtype,atol", [("bfloat16", "float32", 0.05),
                                                            ("float32", "bfloat16", 0.1),
                                                            ("bfloat16", "bfloat16", 0.1)])
def test_precision(mistral_dir, param_dtype, compute_dtype, atol):
    tokens = random_tokens(2, 12)
    reference = jax_logits(hf_io.load_pretrained(mistral_dir)[0], tokens)
    model, _ = hf_io.load_pretrained(mistral_dir, param_dtype=param_dtype, compute_dtype=compute_dtype)
    assert {p.dtype for p in jax.tree.leaves(_params(model))} == {jnp.dtype(param_dtype)}
    logits = jax_logits(model, tokens)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference, rtol=0, atol=atol)
    assert np.abs(logits - reference).max() > 0  # the lower precision really ran


@pytest.mark.parametrize("equation, x_shape, kernel_shape, out_dtype", [
    ("bse,em->bsm", (2, 5, 8), (8, 12), None),  # MLP gate/up
    ("bse,ehd->bshd", (2, 5, 8), (8, 3, 4), None),  # q/k/v
    ("bshd,hde->bse", (2, 5, 3, 4), (3, 4, 8), None),  # attention output
    ("bse,ev->bsv", (2, 5, 8), (8, 32), jnp.float32),  # output layer: float32 logits from any compute dtype
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_projection_gradients_equal_autodiff(equation, x_shape, kernel_shape, out_dtype, dtype):
    rng = np.random.default_rng(0)
    x, kernel = (jnp.asarray(rng.standard_normal(s), dtype) for s in (x_shape, kernel_shape))
    want_y, want_vjp = jax.vjp(lambda a, b: jnp.einsum(equation, a, b, preferred_element_type=out_dtype), x, kernel)
    y, vjp = jax.vjp(layers.projection(equation, out_dtype), x, kernel)
    np.testing.assert_array_equal(y, want_y)
    assert y.dtype == want_y.dtype
    cot = jnp.asarray(rng.standard_normal(y.shape), y.dtype)
    for got, want in zip(vjp(cot), want_vjp(cot)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_save_dots_keeps_every_projection_output(mistral_dir, capsys):
    """Dense is a custom_vjp, whose dot `checkpoint_dots` alone would not see: the policy must still save it."""
    model, cfg = hf_io.load_pretrained(mistral_dir, scan_layers=False, remat="save_dots")
    block = model.layers[0]
    x = jnp.ones((1, 6, cfg.hidden_size))
    mask = kernels.AttentionMask(*(jnp.ones((1, 6), jnp.int32),) * 2, jnp.arange(6)[None], jnp.arange(6), None)
    graphdef, state = nnx.split(block)
    policy = transformer.REMAT_POLICIES["save_dots"]
    fn = jax.checkpoint(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x, jnp.arange(6)[None], mask)[0]), policy=policy)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(fn, state, x)
    saved = capsys.readouterr().out.splitlines()
    # q, k, v, o, gate, up projections (down's output only feeds the residual sum) and attention's two dots
    assert sum("named 'projection'" in s for s in saved) == 6, saved
    assert sum("output of dot_general" in s for s in saved) == 2, saved
