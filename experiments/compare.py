"""Arm-level probe statistics shared by the sweep and the durability reports: an arm's margins over its seeds, and its
shift against a baseline arm (paired by seed) minus the neutral set's shift, through eval.probes.report / eval.stats.

Reporting several probe sets and arms together is a family of comparisons: `family` counts them and every
comparison also gets a Bonferroni-adjusted interval (family-wise 95%), beside its ordinary 95% CI.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval import probe_pairs, probes, stats

Margins = Mapping[int, Mapping[str, Sequence[float]]]  # seed -> probe set -> per-pair margins


def arm_summary(pairs: Sequence[probe_pairs.Pair], runs: Margins, name: str, n_boot: int) -> dict[str, Any] | None:
    """An arm's mean margin on set `name` over its seeds, with the two-level bootstrap CI (None without runs)."""
    seeds = sorted(runs)
    if not seeds:
        return None
    result = stats.summarize(np.stack([runs[s][name] for s in seeds]), n_boot=n_boot)
    return {"margin": result["margin"], "margin_ci95": result["ci95"]["margin"], "accuracy": result["accuracy"],
            "seeds": seeds}


def versus(pairs: Sequence[probe_pairs.Pair], treat: Margins, base: Margins, name: str, *, has_control: bool, n_boot: int,
           adjusted_level: float) -> dict[str, Any] | None:
    """Treatment arm vs baseline arm on set `name`, over the seeds both have (paired by seed); None if none."""
    seeds = sorted(set(treat) & set(base))
    if not seeds:
        return None
    stack = lambda runs, key: np.stack([runs[s][key] for s in seeds])  # noqa: E731
    result = probes.report(pairs, stack(treat, name), baseline=stack(base, name),
                           control=(stack(treat, "control"), stack(base, "control")) if has_control else None,
                           paired_runs=True, n_boot=n_boot, adjusted_level=adjusted_level)["vs_baseline"]
    out = {"seeds": seeds, "margin_diff": result["margin_diff"], "margin_diff_ci95": result["margin_diff_ci95"],
           "margin_diff_ci_adjusted": result["margin_diff_ci_adjusted"]}
    if has_control:
        c = result["control"]
        out |= {"control_shift": c["control_shift"], "difference": c["difference"],
                "difference_ci95": c["difference_ci95"], "difference_ci_adjusted": c["difference_ci_adjusted"]}
    return out


def headline(comparison: Mapping[str, Any]) -> tuple[float, list[float], list[float]]:
    """(value, 95% CI, adjusted CI) of the number to report: shift minus neutral shift, else the margin shift."""
    if "difference" in comparison:
        return comparison["difference"], comparison["difference_ci95"], comparison["difference_ci_adjusted"]
    return comparison["margin_diff"], comparison["margin_diff_ci95"], comparison["margin_diff_ci_adjusted"]


def family_note(comparisons: int, sets: Sequence[str], level: float) -> str:
    """The sentence every report carries about how many comparisons it makes and how they are corrected."""
    if not comparisons:
        return "No comparisons against a baseline were made (no baseline arm with matching seeds)."
    return (f"{comparisons} comparisons are reported together ({len(sets)} probe set(s): {', '.join(sets)}). "
            f"Each has its 95% CI and a Bonferroni-adjusted CI (each at {level:.4%}, so that all {comparisons} "
            "cover their true values together with 95% probability); call an effect reliable only when its adjusted "
            "CI excludes 0.")
