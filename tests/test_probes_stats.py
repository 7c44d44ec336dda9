"""eval.stats on synthetic margins with known answers: pair bootstrap, paired differences, runs as a variance level,
and the value-set shift minus the neutral-control shift."""
import numpy as np
import pytest

from eval import stats


def test_constant_margins_have_degenerate_cis():
    s = stats.summarize(np.full(50, 0.25))
    assert s["accuracy"] == 1.0 and s["margin"] == 0.25 and s["n"] == 50 and s["runs"] == 1
    assert s["ci95"] == {"accuracy": [1.0, 1.0], "margin": [0.25, 0.25]}


def test_pair_bootstrap_matches_normal_theory():
    rng = np.random.default_rng(1)
    x = rng.normal(0.1, 1.0, 400)
    s = stats.summarize(x, n_boot=8000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    lo, hi = s["ci95"]["margin"]
    assert s["margin"] == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half) and hi == pytest.approx(x.mean() + half, abs=0.1 * half)
    p = (x > 0).mean()
    acc_half = 1.96 * np.sqrt(p * (1 - p) / len(x))
    assert s["ci95"]["accuracy"][1] - s["ci95"]["accuracy"][0] == pytest.approx(2 * acc_half, rel=0.15)


def test_paired_exact_shift():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, (1, 80))
    out = stats.paired(base + 0.3, base)
    assert out["margin_diff"] == pytest.approx(0.3)
    assert out["margin_diff_ci95"] == pytest.approx([0.3, 0.3])
    assert out["frac_toward_chosen"] == 1.0 and out["frac_toward_chosen_ci95"] == [1.0, 1.0]
    assert out["runs"] == [1, 1] and out["n"] == 80


def test_paired_accuracy_difference():
    base = np.full((1, 40), -0.1)
    treat = np.where(np.arange(40) < 20, 0.1, -0.1)[None]
    out = stats.paired(treat, base)
    assert out["accuracy_diff"] == 0.5 and out["frac_toward_chosen"] == 0.5
    lo, hi = out["accuracy_diff_ci95"]
    assert lo < 0.5 < hi and lo > 0.25 and hi < 0.75


def test_run_variance_enters_the_ci():
    """Every pair moves by a run-level offset (+1, -1, +0.1): a pairs-only bootstrap of the run-averaged margins would
    give a zero-width CI at +0.033; with runs resampled, the CI must span the run-to-run spread and include 0."""
    rng = np.random.default_rng(3)
    base = rng.normal(0, 0.5, (3, 60))
    treat = base + np.array([1.0, -1.0, 0.1])[:, None]
    out = stats.paired(treat, base)
    assert out["margin_diff"] == pytest.approx(0.1 / 3)
    lo, hi = out["margin_diff_ci95"]
    assert lo < -0.3 and hi > 0.3
    # The same data pooled over runs into one averaged run has no such spread.
    pooled = stats.paired(treat.mean(0, keepdims=True), base.mean(0, keepdims=True))
    assert pooled["margin_diff_ci95"][1] - pooled["margin_diff_ci95"][0] < 1e-9


def test_paired_rejects_mismatched_pairs():
    with pytest.raises(ValueError, match="same pairs"):
        stats.paired(np.zeros((2, 5)), np.zeros((1, 6)))


def test_shift_minus_control():
    rng = np.random.default_rng(4)
    noise = lambda n: rng.normal(0, 0.05, (3, n))  # noqa: E731
    # Pairs differ a lot; runs of one arm differ little (as seeds of one training recipe do).
    base, base_ctl = rng.normal(0, 1, (1, 150)) + noise(150), rng.normal(0, 1, (1, 100)) + noise(100)
    # A generic style shift of +0.1 on both sets: the value-specific part is zero.
    generic = stats.shift_minus_control(base + 0.1 + noise(150), base, base_ctl + 0.1 + noise(100), base_ctl)
    assert generic["set_shift"] == pytest.approx(0.1, abs=0.02)
    assert generic["control_shift"] == pytest.approx(0.1, abs=0.02)
    assert generic["difference_ci95"][0] < 0 < generic["difference_ci95"][1]
    # A value-specific shift of +0.2 on top of it: the difference is 0.2 and its CI excludes zero.
    specific = stats.shift_minus_control(base + 0.3 + noise(150), base, base_ctl + 0.1 + noise(100), base_ctl)
    assert specific["difference"] == pytest.approx(0.2, abs=0.02)
    assert specific["difference_ci95"][0] > 0.15 and specific["difference_ci95"][1] < 0.25
    with pytest.raises(ValueError, match="same runs"):
        stats.shift_minus_control(base, base, base_ctl[:2], base_ctl)


def test_paired_runs_cancel_the_seed_effect():
    """Run i of both arms shares a seed whose effect (+-0.5) is identical in both: a seed-matched bootstrap sees an
    exact +0.1 shift, an independent one sees the seed spread."""
    rng = np.random.default_rng(5)
    base = rng.normal(0, 1, (1, 100)) + np.array([0.5, -0.5, 0.0])[:, None]
    treat = base + 0.1
    matched = stats.paired(treat, base, paired_runs=True)
    assert matched["margin_diff_ci95"] == pytest.approx([0.1, 0.1])
    independent = stats.paired(treat, base)
    assert independent["margin_diff_ci95"][0] < -0.1 and independent["margin_diff_ci95"][1] > 0.3
    with pytest.raises(ValueError, match="as many"):
        stats.paired(treat, base[:2], paired_runs=True)


def test_bonferroni_adjusted_intervals():
    """m comparisons: each at 1 - 0.05/m; the adjusted interval comes from the same resamples, so it contains the 95%
    one and equals the 1-0.05/m percentile interval of those replicates."""
    assert stats.bonferroni_level(1) == pytest.approx(0.95)
    assert stats.bonferroni_level(10) == pytest.approx(0.995)
    with pytest.raises(ValueError):
        stats.bonferroni_level(0)
    rng = np.random.default_rng(6)
    base, ctl = rng.normal(0, 1, (2, 80)), rng.normal(0, 1, (2, 60))
    treat, treat_ctl = base + rng.normal(0.1, 0.3, (2, 80)), ctl + rng.normal(0, 0.3, (2, 60))
    level = stats.bonferroni_level(8)
    r = stats.shift_minus_control(treat, base, treat_ctl, ctl, paired_runs=True, adjusted_level=level)
    plain = stats.shift_minus_control(treat, base, treat_ctl, ctl, paired_runs=True)
    assert r["difference_ci95"] == plain["difference_ci95"] and "difference_ci_adjusted" not in plain
    lo, hi = r["difference_ci_adjusted"]
    assert lo < r["difference_ci95"][0] and hi > r["difference_ci95"][1] and r["adjusted_level"] == level
    p = stats.paired(base + rng.normal(0.1, 0.3, (2, 80)), base, adjusted_level=level)
    assert p["margin_diff_ci_adjusted"][0] < p["margin_diff_ci95"][0] < p["margin_diff_ci95"][1] \
        < p["margin_diff_ci_adjusted"][1]
