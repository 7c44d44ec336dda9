"""Bootstrap statistics for paired probe margins, with several runs (seeds) per arm.

Margins are `[runs, pairs]` arrays: one row per trained model of an arm (a seed), one column per probe pair. Every CI
is a percentile bootstrap that resamples pairs and, independently, runs (with replacement), so both the item sample
and run-to-run training variance enter it (a two-level, "hierarchical" bootstrap). With one run per arm it reduces to
the ordinary pair bootstrap. With few runs the run level is coarse (3 seeds give 10 distinct resamples) and slightly
underestimates between-run variance; it is still far better than ignoring it.
"""
from __future__ import annotations

import numpy as np

DEFAULT_RESAMPLES = 4000


def _as_runs(margins: np.ndarray) -> np.ndarray:
    m = np.asarray(margins, dtype=np.float64)
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"margins must be [runs, pairs] with at least one of each, got shape {np.shape(margins)}")
    return m


def _interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def bonferroni_level(comparisons: int, family_level: float = 0.95) -> float:
    """Per-comparison confidence level whose intervals cover all `comparisons` true values at `family_level`
    (Bonferroni: each at 1 - (1 - family_level) / comparisons)."""
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    return 1 - (1 - family_level) / comparisons


def _run_weights(rng: np.random.Generator, n_boot: int, runs: int) -> np.ndarray:
    """`[B, runs]` weights of each run in each replicate: resample `runs` runs with replacement, as frequencies."""
    idx = rng.integers(0, runs, size=(n_boot, runs))
    return np.stack([np.bincount(r, minlength=runs) for r in idx]) / runs


def _pair_idx(rng: np.random.Generator, n_boot: int, pairs: int) -> np.ndarray:
    """`[B, pairs]` resampled pair indices."""
    return rng.integers(0, pairs, size=(n_boot, pairs))


def _per_pair(values: np.ndarray, run_w: np.ndarray, pair_idx: np.ndarray) -> np.ndarray:
    """values `[runs, pairs]` -> `[B, pairs]`: each replicate's run-weighted value of each resampled pair."""
    return np.take_along_axis(run_w @ values, pair_idx, axis=1)


def summarize(margins: np.ndarray, *, n_boot: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """One arm's score on one probe set: accuracy (fraction of pairs with margin > 0) and mean margin, each the mean
    over runs, with hierarchical bootstrap CIs. margins `[runs, pairs]` (or `[pairs]`)."""
    m = _as_runs(margins)
    rng = np.random.default_rng(seed)
    pair_idx, run_w = _pair_idx(rng, n_boot, m.shape[1]), _run_weights(rng, n_boot, m.shape[0])
    wins = (m > 0).astype(np.float64)
    return {
        "accuracy": float(wins.mean()),
        "margin": float(m.mean()),
        "ci95": {"accuracy": list(_interval(_per_pair(wins, run_w, pair_idx).mean(1))),
                 "margin": list(_interval(_per_pair(m, run_w, pair_idx).mean(1)))},
        "n": int(m.shape[1]),
        "runs": int(m.shape[0]),
    }


def _arm_weights(rng: np.random.Generator, n_boot: int, runs_t: int, runs_b: int,
                 paired_runs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Run weights of the two arms: independent, or shared when run i of each arm is a matched pair (same seed)."""
    if paired_runs:
        if runs_t != runs_b:
            raise ValueError(f"paired runs need as many treatment as baseline runs, got {runs_t} and {runs_b}")
        w = _run_weights(rng, n_boot, runs_t)
        return w, w
    return _run_weights(rng, n_boot, runs_t), _run_weights(rng, n_boot, runs_b)


def paired(treat: np.ndarray, base: np.ndarray, *, paired_runs: bool = False, n_boot: int = DEFAULT_RESAMPLES,
           seed: int = 0, adjusted_level: float | None = None) -> dict:
    """Treatment arm vs baseline arm on the same pairs. treat `[runs_t, pairs]`, base `[runs_b, pairs]`.

    Runs are resampled independently per arm, or jointly with `paired_runs` (run i of both arms shares a seed, so
    the seed's own effect cancels in the difference).

    margin_diff: mean over pairs of (treatment mean margin - baseline mean margin); accuracy_diff likewise for the
    0/1 wins; frac_toward_chosen: fraction of pairs whose run-averaged margin rose. Each with a 95% CI; with
    `adjusted_level`, margin_diff also gets `margin_diff_ci_adjusted` at that level (same resamples).
    """
    t, b = _as_runs(treat), _as_runs(base)
    if t.shape[1] != b.shape[1]:
        raise ValueError(f"paired comparison needs the same pairs in both arms: {t.shape[1]} vs {b.shape[1]} pairs")
    rng = np.random.default_rng(seed)
    # The same resampled pairs for both arms (the comparison is paired); runs are resampled per arm.
    pair_idx = _pair_idx(rng, n_boot, t.shape[1])
    t_w, b_w = _arm_weights(rng, n_boot, t.shape[0], b.shape[0], paired_runs)
    shift = _per_pair(t, t_w, pair_idx) - _per_pair(b, b_w, pair_idx)                        # [B, pairs]
    margin = shift.mean(1)
    acc = (_per_pair((t > 0).astype(np.float64), t_w, pair_idx)
           - _per_pair((b > 0).astype(np.float64), b_w, pair_idx)).mean(1)
    toward = (shift > 0).mean(1)
    point_shift = t.mean(0) - b.mean(0)
    adjusted = ({"margin_diff_ci_adjusted": list(_interval(margin, adjusted_level)), "adjusted_level": adjusted_level}
                if adjusted_level is not None else {})
    return {
        "margin_diff": float(point_shift.mean()),
        "margin_diff_ci95": list(_interval(margin)),
        "accuracy_diff": float((t > 0).mean() - (b > 0).mean()),
        "accuracy_diff_ci95": list(_interval(acc)),
        "frac_toward_chosen": float((point_shift > 0).mean()),
        "frac_toward_chosen_ci95": list(_interval(toward)),
        "n": int(t.shape[1]),
        "runs": [int(t.shape[0]), int(b.shape[0])],
        **adjusted,
    }


def shift_minus_control(treat: np.ndarray, base: np.ndarray, treat_ctl: np.ndarray, base_ctl: np.ndarray, *,
                        paired_runs: bool = False, n_boot: int = DEFAULT_RESAMPLES, seed: int = 0,
                        adjusted_level: float | None = None) -> dict:
    """(value set's paired margin shift) - (neutral control set's paired margin shift), with a 95% CI, and with
    `adjusted_level` also an interval at that level from the same resamples (`difference_ci_adjusted`, e.g. a
    Bonferroni level from `bonferroni_level` when several comparisons are reported together).

    treat/base `[runs, pairs]` on the value set, treat_ctl/base_ctl `[runs, control_pairs]` on the control set, row r
    being the same trained model in both. Each replicate resamples runs once per arm (shared by both sets, since a
    model's generic style shift shows in both; jointly across arms with `paired_runs`) and pairs independently
    within each set.
    """
    t, b, tc, bc = (_as_runs(x) for x in (treat, base, treat_ctl, base_ctl))
    if t.shape[0] != tc.shape[0] or b.shape[0] != bc.shape[0]:
        raise ValueError("the value and control sets must be scored by the same runs of each arm")
    rng = np.random.default_rng(seed)
    t_w, b_w = _arm_weights(rng, n_boot, t.shape[0], b.shape[0], paired_runs)
    pairs, pairs_ctl = _pair_idx(rng, n_boot, t.shape[1]), _pair_idx(rng, n_boot, tc.shape[1])
    set_shift = (_per_pair(t, t_w, pairs) - _per_pair(b, b_w, pairs)).mean(1)
    ctl_shift = (_per_pair(tc, t_w, pairs_ctl) - _per_pair(bc, b_w, pairs_ctl)).mean(1)
    point_set, point_ctl = float(t.mean() - b.mean()), float(tc.mean() - bc.mean())
    out = {
        "set_shift": point_set,
        "control_shift": point_ctl,
        "difference": point_set - point_ctl,
        "difference_ci95": list(_interval(set_shift - ctl_shift)),
    }
    if adjusted_level is not None:
        out["difference_ci_adjusted"] = list(_interval(set_shift - ctl_shift, adjusted_level))
        out["adjusted_level"] = adjusted_level
    return out
