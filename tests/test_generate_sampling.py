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
    out = np.asarray(sampling.top_p_filter(jnp.asarray(logits), jnp.full((4,), top_p)))
    for row in range(4):
        expected = _nucleus_reference(logits[row], top_p)
        np.testing.assert_array_equal(np.isfinite(out[row]), expected)
        np.testing.assert_array_equal(out[row][expected], logits[row][expected])


def test_top_p_per_row_one_keeps_all_and_tiny_is_argmax():
    # A peaked row, where float rounding of the cumulative sum reaches 1 before the last tokens.
    logits = np.random.default_rng(1).normal(size=(3, 200)).astype(np.float32)
    logits[0, 0] = 40.0
    out = np.asarray(sampling.top_p_filter(jnp.asarray(logits), jnp.array([1.0, 1.0, 1e-6])))
    np.testing.assert_array_equal(out[:2], logits[:2])
    assert np.isfinite(out[2]).sum() == 1 and np.argmax(out[2]) == np.argmax(logits[2])


def _select(logits, seeds, temperature, top_p):
    n = len(seeds)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    return np.asarray(jax.jit(sampling.select_tokens)(
        jnp.asarray(logits, jnp.float32), keys, jnp.full((n,), temperature), jnp.full((n,), top_p)))


def test_greedy_rows_are_argmax():
    logits = np.random.default_rng(2).normal(size=(5, 30))
    got = _select(logits, range(5), 0.0, 0.5)
    np.testing.assert_array_equal(got, np.argmax(logits, -1))
    assert got.dtype == np.int32


def test_rows_mix_greedy_and_sampling():
    logits = np.zeros((2, 1000), np.float32)
    logits[:, 7] = 1.0
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    got = np.asarray(sampling.select_tokens(jnp.asarray(logits), keys, jnp.array([0.0, 1.0]), jnp.ones(2)))
    assert got[0] == 7 and got[1] != 7  # the sampled row almost surely picks one of the 999 other tokens


def _frequencies(logits: np.ndarray, temperature: float, top_p: float, n: int, seed: int = 0) -> np.ndarray:
    batch = np.broadcast_to(logits, (n, logits.shape[-1]))
    tokens = _select(batch, np.arange(n) + seed * n, temperature, top_p)
    return np.bincount(tokens, minlength=logits.shape[-1]) / n


def test_temperature_sampling_matches_scaled_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5], np.float32)
    n = 40_000
    for temperature in (0.5, 1.0, 2.0):
        freq = _frequencies(logits, temperature, 1.0, n)
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        # 5 binomial standard errors at most.
        np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / n))


def test_top_p_sampling_renormalizes_inside_the_nucleus():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))
    n = 40_000
    freq = _frequencies(logits, 1.0, 0.8, n)
    # 0.5 + 0.25 = 0.75 < 0.8, so the nucleus is the first three tokens.
    expected = np.array([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    assert freq[3:].sum() == 0.0
    np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / n))


def test_a_rows_sample_depends_only_on_its_own_key():
    logits = np.random.default_rng(3).normal(size=(4, 1000)).astype(np.float32)
    alone = _select(logits[2:3], [42], 1.0, 0.9)
    batched = _select(logits, [1, 2, 42, 3], 1.0, 0.9)
    assert alone[0] == batched[2]
    assert not np.array_equal(_select(logits, [5, 6, 7, 8], 1.0, 1.0), _select(logits, [9, 10, 11, 12], 1.0, 1.0))


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
