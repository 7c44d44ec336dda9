"""The analysis of bench/gpu_experiment.py's runs: every probed step of the midtraining and the wash-out compared
across arms (margins over seeds; paired shift minus the neutral set's shift, with 95% and Bonferroni CIs), the
summary tables and the curve."""
from __future__ import annotations

import pathlib
import statistics
from typing import Any

import numpy as np

from bench.gpu_experiment import (ARM_PAIRS, ARMS, CONTROL_SET, VALUE_SETS, Run, Scale, format_plan,
                                  probe_records)


def timeline(all_runs: list[Run], work: pathlib.Path) -> dict[str, dict[int, dict[int, dict[str, list]]]]:
    """{phase: {step: {seed: {arm: margins by set}}}} of every finished run's probed steps."""
    out: dict[str, dict[int, dict[int, dict[str, Any]]]] = {}
    for run in all_runs:
        for rec in probe_records(work / "runs" / run.name):
            out.setdefault(run.phase, {}).setdefault(rec["step"], {}).setdefault(run.seed, {})[run.arm] = \
                rec["margins"]
    return out


def compare_point(by_seed: dict[int, dict[str, dict[str, list]]], n_boot: int) -> dict[str, Any]:
    """One probed step: per arm and set the margin over seeds [95% CI]; per arm pair and value set (over the seeds
    that have both arms) the paired shift minus the neutral set's shift, 95% and Bonferroni CIs."""
    from eval import stats

    family = len(ARM_PAIRS) * len(VALUE_SETS)
    level = stats.bonferroni_level(family)
    arms = {}
    for arm in ARMS:
        seeds = sorted(s for s, a in by_seed.items() if arm in a)
        if seeds:
            arms[arm] = {"seeds": seeds, **{name: stats.summarize(np.array([by_seed[s][arm][name] for s in seeds]),
                                                                  n_boot=n_boot)
                                            for name in (*VALUE_SETS, CONTROL_SET)}}
    pairs = {}
    for treat, base in ARM_PAIRS:
        seeds = sorted(s for s, a in by_seed.items() if treat in a and base in a)
        if len(seeds) < 2:
            continue
        m = {(arm, name): np.array([by_seed[s][arm][name] for s in seeds])
             for arm in (treat, base) for name in (*VALUE_SETS, CONTROL_SET)}
        pairs[f"{treat}_vs_{base}"] = {"seeds": seeds, **{name: stats.shift_minus_control(
            m[treat, name], m[base, name], m[treat, CONTROL_SET], m[base, CONTROL_SET], paired_runs=True,
            n_boot=n_boot, adjusted_level=level) for name in VALUE_SETS}}
    return {"arms": arms, "comparisons": pairs, "comparisons_per_step": family}


def analyze(all_runs: list[Run], work: pathlib.Path, scale: Scale, n_boot: int) -> list[dict[str, Any]]:
    """Every probed step of the midtraining, then of the wash-out (x = midtraining steps + SFT step), compared."""
    points = []
    for phase, offset in (("midtrain", 0), ("sft", scale.midtrain_steps)):
        for step, by_seed in sorted(timeline(all_runs, work).get(phase, {}).items()):
            points.append({"phase": phase, "step": step, "x": offset + step, **compare_point(by_seed, n_boot)})
    return points


def fmt(ci: list[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def summary_md(points: list[dict[str, Any]], p: dict[str, Any], timings: dict[str, Any], device: str) -> str:
    lines = ["# SmolLM2-135M: 0% / 25% welfare / 25% matched control, then an SFT wash-out", "",
             f"Device: {device}. Seeds {p['seeds']}. Plan (bench/gpu_experiment.py):", "", "```", format_plan(p),
             "```", ""]
    if timings:
        total = sum(t["seconds"] for t in timings.values())
        lines += [f"Measured: {total:.0f} s for {len(timings)} runs trained in this invocation; median tokens/s "
                  f"{statistics.median(t['tokens_per_s'] for t in timings.values() if t['tokens_per_s']):,.0f}.", ""]
    ends = [pt for pt in points if pt["phase"] == "midtrain"][-1:] + [pt for pt in points if pt["phase"] == "sft"][-1:]
    for pt in ends:
        title = "end of midtraining" if pt["phase"] == "midtrain" else "end of the wash-out"
        lines += [f"## {title} (step {pt['step']})", "", "| arm | " + " | ".join(VALUE_SETS + (CONTROL_SET,)) + " |",
                  "|---" * (len(VALUE_SETS) + 2) + "|"]
        for arm, a in pt["arms"].items():
            lines.append(f"| {arm} | " + " | ".join(f"{a[s]['margin']:+.4f} {fmt(a[s]['ci95']['margin'])}"
                                                    for s in VALUE_SETS + (CONTROL_SET,)) + " |")
        lines += ["", "| comparison | probe set | shift | neutral shift | shift - neutral [95% CI] | Bonferroni CI |",
                  "|---|---|---|---|---|---|"]
        for pair, c in pt["comparisons"].items():
            for s in VALUE_SETS:
                d = c[s]
                lines.append(f"| {pair} | {s} | {d['set_shift']:+.4f} | {d['control_shift']:+.4f} | "
                             f"{d['difference']:+.4f} {fmt(d['difference_ci95'])} | "
                             f"{fmt(d['difference_ci_adjusted'])} |")
        lines.append("")
    curve = [pt for pt in points if "welfare_vs_base" in pt["comparisons"]]
    if curve:
        lines += ["## Wash-out curve: welfare vs 0%, shift - neutral shift [95% CI]", "",
                  "| phase | step | " + " | ".join(VALUE_SETS) + " |", "|---|---" + "|---" * len(VALUE_SETS) + "|"]
        for pt in curve:
            c = pt["comparisons"]["welfare_vs_base"]
            lines.append(f"| {pt['phase']} | {pt['step']} | " + " | ".join(
                f"{c[s]['difference']:+.4f} {fmt(c[s]['difference_ci95'])}" for s in VALUE_SETS) + " |")
    return "\n".join(lines) + "\n"


def draw(points: list[dict[str, Any]], path: pathlib.Path, midtrain_steps: int) -> bool:
    """Margins per arm and the welfare and control arms' shift - neutral shift against 0%, over the midtraining
    and the wash-out (x: training steps, the wash-out's after the midtraining's)."""
    from eval import plots

    panels: dict[str, dict[str, list[list[float]]]] = {}
    for pt in points:
        for arm, a in pt["arms"].items():
            for s in VALUE_SETS[:2]:
                panels.setdefault(f"margin: {s}", {}).setdefault(arm, []).append(
                    [pt["x"], a[s]["margin"], *a[s]["ci95"]["margin"]])
        for pair in ("welfare_vs_base", "control_vs_base"):
            if pair in pt["comparisons"]:
                for s in VALUE_SETS[:2]:
                    d = pt["comparisons"][pair][s]
                    panels.setdefault(f"shift - neutral shift vs 0%: {s}", {}).setdefault(pair.split("_")[0], []) \
                        .append([pt["x"], d["difference"], *d["difference_ci95"]])
    return plots.draw(panels, f"training step (wash-out from step {midtrain_steps})", path, lines=True,
                      integer_x=True, min_x_values=2, dodge=True)
