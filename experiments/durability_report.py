"""The durability report: decay curves (each arm's probe margin, and its shift against the base arm at the same point
minus the neutral set's shift) against SFT samples, with 95% CIs; each arm's in-loop probe margin over its training
steps (midtraining, then SFT); a table of every arm x point x probe set (points that could not be evaluated are
listed as missing); report.md with the number of comparisons and the correction."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

import storage
from eval import plots, stats
from eval import report as eval_report
from experiments import compare, priced
from experiments.evaluate import EvalSettings


def _by_point(results: Mapping[int, list[tuple[int, dict]]]) -> list[tuple[float, dict[int, dict]]]:
    """[(mean samples over seeds, {seed: margins})] per evaluation point index."""
    n = max((len(v) for v in results.values()), default=0)
    out = []
    for j in range(n):
        at = {seed: pts[j] for seed, pts in results.items() if len(pts) > j}
        out.append((float(np.mean([p[0] for p in at.values()])), {seed: p[1] for seed, p in at.items()}))
    return out


def rows(planned: Mapping[str, Mapping[int, list]], results: Mapping[str, Mapping[int, list]], s: EvalSettings,
         arms: tuple[str, ...], seeds: tuple[int, ...]) -> tuple[list[dict[str, Any]], int, float]:
    """A row per arm x planned point x value set; a point planned but not evaluated (its stage failed) is listed as
    missing, an arm whose first stage failed as one missing row per set. Arms are compared at the same point index
    (the same number of evaluation intervals of their own SFT)."""
    sets = s.read_sets()
    curves = {arm: _by_point(results.get(arm, {})) for arm in arms}
    base = curves.get("base", [])
    family = sum(1 for arm in arms if arm != "base" for j in range(min(len(curves[arm]), len(base)))
                 if set(curves[arm][j][1]) & set(base[j][1])) * len(s.set_names)
    level = stats.bonferroni_level(max(family, 1))
    out = []
    for arm in arms:
        for j in range(max([len(p) for p in planned.get(arm, {}).values()] + [len(curves[arm]), 1])):
            for name in s.set_names:
                row: dict[str, Any] = {"arm": arm, "point": j, "set": name, "seeds_planned": len(seeds)}
                if j >= len(curves[arm]):
                    out.append(row | {"samples": None, "seeds_evaluated": 0, "status": "missing"})
                    continue
                samples, margins = curves[arm][j]
                row |= {"samples": samples, "seeds_evaluated": len(margins), "status": "evaluated"}
                summary = compare.arm_summary(sets[name], margins, name, s.bootstrap)
                row |= {"margin": summary["margin"], "margin_lo": summary["margin_ci95"][0],
                        "margin_hi": summary["margin_ci95"][1]}
                if arm != "base" and j < len(base):
                    vs = compare.versus(sets[name], margins, base[j][1], name, has_control=s.control_pairs is not None,
                                        n_boot=s.bootstrap, adjusted_level=level)
                    if vs:
                        value, ci, adj = compare.headline(vs)
                        row |= {"vs_base": value, "lo": ci[0], "hi": ci[1], "adjusted_lo": adj[0],
                                "adjusted_hi": adj[1]}
                out.append(row)
    return out, family, level


def curve_panels(table: list[dict[str, Any]], has_control: bool) -> dict[str, plots.Series]:
    """{panel: {arm: [[samples, y, lo, hi], ...]}}: per probe set each arm's margin, and each arm's shift against the
    base arm (which is 0 by definition: the panel's zero line). Arms are compared at the same point index, so every
    arm is drawn at the base arm's sample count of that point (the preservation arm's SFT mixes in documents, so its
    j-th point comes after a few more steps; the table keeps its own count)."""
    shift = "shift - neutral shift vs base arm" if has_control else "shift vs base arm"
    base_x = {r["point"]: r["samples"] for r in table if r["arm"] == "base" and r["status"] == "evaluated"}
    panels: dict[str, plots.Series] = {}
    for r in table:
        if r["status"] != "evaluated":
            continue
        x = base_x.get(r["point"], r["samples"])
        panels.setdefault(f"margin: {r['set']} (nats/token)", {}).setdefault(r["arm"], []).append(
            [x, r["margin"], r["margin_lo"], r["margin_hi"]])
        if "vs_base" in r:
            panels.setdefault(f"{shift}: {r['set']}", {}).setdefault(r["arm"], []).append(
                [x, r["vs_base"], r["lo"], r["hi"]])
    return {t: {a: sorted(p) for a, p in series.items()} for t, series in panels.items()}


def training_panels(c, s: EvalSettings, status: Mapping[str, Mapping]) -> dict[str, plots.Series]:
    """{panel: {arm: [[step, margin, lo, hi], ...]}}: each value set's in-loop margin (trainer.probes_in_loop) over
    the steps of every stage that trained the arm (durability.history: midtraining or QA tuning, then the general
    SFT, one x axis), mean over seeds with the two-level bootstrap CI. A stage's step 0 is left out when the stage
    before it was probed (its last step holds the same parameters). Stages that did not finish are left out."""
    from experiments import durability
    from trainer import probes_in_loop

    sets = s.read_sets()
    by_x: dict[str, dict[float, dict[int, dict]]] = {}
    for arm in c.arms:
        for seed in c.seeds:
            offset, probed = 0, False
            for name, steps in durability.history(c, arm, seed):
                records = probes_in_loop.read(c.run_dir(name)) if status.get(name, {}).get("status") == "done" else []
                for r in records:
                    if r["step"] > 0 or not probed:
                        margins = s.in_loop_margins(r, f"{c.run_dir(name) / probes_in_loop.FILE} step {r['step']}")
                        by_x.setdefault(arm, {}).setdefault(float(offset + r["step"]), {})[seed] = margins
                offset, probed = offset + steps, bool(records)
    panels: dict[str, plots.Series] = {}
    for name in s.set_names:
        series = {arm: [[x, summary["margin"], *summary["margin_ci95"]] for x, runs in sorted(points.items())
                        if (summary := compare.arm_summary(sets[name], runs, name, s.bootstrap))]
                  for arm, points in by_x.items()}
        if series:
            panels[f"in-loop margin: {name} (nats/token)"] = series
    return panels


def write(c, planned: Mapping[str, Mapping[int, list]], results: Mapping[str, Mapping[int, list]],
          status: Mapping[str, Mapping], s: EvalSettings, out: storage.Path, est: Any = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    table, family, level = rows(planned, results, s, c.arms, c.seeds)
    eval_report.write_table(table, out, "durability")
    panels = curve_panels(table, s.control_pairs is not None)
    plots.draw(panels, "general SFT samples (the base arm's count at each point)", out / "curve.png", lines=True,
               integer_x=True, dodge=True)
    figures = {"curve.png": panels}
    training = training_panels(c, s, status)
    if training:
        plots.draw(training, "training steps (midtraining or QA tuning, then the general SFT)", out / "training.png",
                   lines=True, integer_x=True)
        figures["training.png"] = training
    (out / "plots.json").write_text(json.dumps(figures, indent=2) + "\n")
    note = compare.family_note(family, s.set_names, level)

    def fmt(r: dict, key: str, lo: str, hi: str) -> str:
        return f"{r[key]:+.4f} [{r[lo]:+.4f}, {r[hi]:+.4f}]" if key in r else "-"

    lines = [f"# Durability report: {c.path.name}", "", f"Arms: {', '.join(c.arms)}; seeds per arm: {list(c.seeds)}.",
             "", note, "", "| arm | SFT samples | probe set | seeds | margin [95% CI] | vs base [95% CI] | "
             "Bonferroni CI |", "|---|---|---|---|---|---|---|"]
    for r in table:
        adj = f"[{r['adjusted_lo']:+.4f}, {r['adjusted_hi']:+.4f}]" if "vs_base" in r else "-"
        samples = f"{r['samples']:.0f}" if r["samples"] is not None else "missing"
        lines.append(f"| {r['arm']} | {samples} | {r['set']} | {r['seeds_evaluated']}/{r['seeds_planned']} | "
                     f"{fmt(r, 'margin', 'margin_lo', 'margin_hi')} | {fmt(r, 'vs_base', 'lo', 'hi')} | {adj} |")
    lines += ["", "## Stages", "", f"| stage | status | {priced.TIME_HEADER} |", "|---|---|---|"]
    stages = {name: priced.against_actual(est, name, c.run_dir(name)) for name in status}
    lines += [f"| {name} | {st['status']} | {priced.time_cell(stages[name])} |" for name, st in sorted(status.items())]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"rows": table, "plots": panels, "comparisons": family, "note": note, "stages": stages}
