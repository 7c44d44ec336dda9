"""Token selection: greedy, temperature and top-p against numpy references and empirical frequencies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import sampling


def _nucleus_reference(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the smallest most-likely set with mass >= top_p, computed one token at a time."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep = np.zeros_like(probs, dtype=bool)
    total = 0.0
    for i in np.argsort(-probs):
        keep[i] = True
        total += probs[i]
        if total >= top_p:
            break
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_filter_keeps_the_nucleus(top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 2.0
    out = np.asarray(sampling.top_p_filter(jnp.asarray(logits), top_p))
    for row in range(4):
        expected = _nucleus_reference(logits[row], top_p)
        np.testing.assert_array_equal(np.isfinite(out[row]), expected)
        np.testing.assert_array_equal(out[row][expected], logits[row][expected])


def test_top_p_one_is_identity_and_tiny_top_p_is_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 20)), jnp.float32)
    assert sampling.top_p_filter(logits, 1.0) is logits
    tiny = np.asarray(sampling.top_p_filter(logits, 1e-6))
    assert (np.isfinite(tiny).sum(axis=-1) == 1).all()
    np.testing.assert_array_equal(np.argmax(tiny, -1), np.argmax(np.asarray(logits), -1))


def test_greedy_is_argmax_and_needs_no_key():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(5, 30)), jnp.float32)
    got = sampling.select_tokens(logits, None, sampling.SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))
    assert got.dtype == jnp.int32


def _frequencies(logits: np.ndarray, params: sampling.SamplingParams, n: int) -> np.ndarray:
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.shape[-1]))
    tokens = jax.jit(sampling.select_tokens, static_argnums=2)(batch, jax.random.key(params.seed), params)
    return np.bincount(np.asarray(tokens), minlength=logits.shape[-1]) / n


def test_temperature_sampling_matches_scaled_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5], np.float32)
    n = 40_000
    for temperature in (0.5, 1.0, 2.0):
        freq = _frequencies(logits, sampling.SamplingParams(temperature=temperature, seed=3), n)
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        # 5 binomial standard errors at most.
        np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / n))


def test_top_p_sampling_renormalizes_inside_the_nucleus():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))
    n = 40_000
    freq = _frequencies(logits, sampling.SamplingParams(temperature=1.0, top_p=0.8, seed=4), n)
    # 0.5 + 0.25 = 0.75 < 0.8, so the nucleus is the first three tokens.
    expected = np.array([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    assert freq[3:].sum() == 0.0
    np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / n))


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = np.zeros(1000, np.float32)
    a = _frequencies(logits, sampling.SamplingParams(temperature=1.0, seed=5), 64)
    b = _frequencies(logits, sampling.SamplingParams(temperature=1.0, seed=5), 64)
    c = _frequencies(logits, sampling.SamplingParams(temperature=1.0, seed=6), 64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_find_stop_returns_the_earliest_stop():
    assert sampling.find_stop("hello world. bye\n", ["\n", "."]) == 11
    assert sampling.find_stop("hello", ["x"]) is None
    assert sampling.find_stop("abc", []) is None


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(stop=("",))],
)
def test_bad_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        sampling.SamplingParams(**kwargs)
