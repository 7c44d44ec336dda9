"""The sweep's report: every configuration of the sweep (missing and failed runs too), the arm comparisons against
the share-0 arm of the same seeds, plots of score vs share and vs document count with CIs, and a markdown summary.

Files in OUT: runs.csv/json (a row per run), arms.csv/json (a row per arm and probe set), plots.json (what the PNGs
show, as {panel: {series: [[x, y, lo, hi], ...]}}), vs_share.png, vs_docs.png (each only when its x axis holds more
than one value; report.md says which were not drawn), report.md; checkpoints/ holds eval.report's per-checkpoint
table and training curves of the finished runs.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import storage
from eval import plots, stats
from eval import report as eval_report
from experiments import compare, priced
from experiments.evaluate import EvalSettings
from experiments.plan import Run, Sweep


def run_rows(sweep: Sweep, status: Mapping[str, Mapping], results: Mapping[str, Mapping],
             est: Any = None) -> list[dict[str, Any]]:
    """One row per configuration of the sweep, in plan order, whatever happened to it; with its estimated time (an
    experiments.estimate.Estimate) beside its actual one (goodput.json) and, priced, their costs."""
    rows = []
    for r in sweep.runs:
        state = status.get(r.name, {}).get("status", "not run")
        if state == "done" and r.name not in results:
            state = "done, not evaluated"
        row: dict[str, Any] = {"run": r.name, "status": state, "model": r.model, "corpus": r.corpus or "",
                               "docs": r.docs, "share": r.share, "synthetic_from": r.synthetic_from or None,
                               "seed": r.seed, "steps": r.train_steps, "total_tokens": r.total_tokens,
                               "synthetic_tokens": r.synthetic_tokens,
                               "epochs_per_doc": r.epochs_per_doc, "baseline": r.baseline or ""}
        row |= priced.against_actual(est, r.name, sweep.run_dir(r))
        res = results.get(r.name)
        if res:
            for name, m in res["margins"].items():
                row[f"probe/{name}/margin"] = sum(m) / len(m)
                row[f"probe/{name}/accuracy"] = sum(x > 0 for x in m) / len(m)
            for comp, loss in res.get("heldout", {}).items():
                row[f"heldout/{comp}/loss"] = loss
            for key, value in (res.get("anima") or {}).items():
                row[f"anima/{key}"] = value
        rows.append(row)
    return rows


def _arms(sweep: Sweep) -> dict[str, list[Run]]:
    arms: dict[str, list[Run]] = {}
    for r in sweep.runs:
        arms.setdefault(r.arm, []).append(r)
    return arms


def arm_rows(sweep: Sweep, results: Mapping[str, Mapping], s: EvalSettings) -> tuple[list[dict[str, Any]], int, float]:
    """A row per arm x value probe set: the arm's margin over its evaluated seeds and, against its share-0 arm, the
    paired shift (minus the neutral shift). Returns (rows, number of comparisons, Bonferroni level)."""
    sets = s.read_sets()
    arms = _arms(sweep)
    margins = {arm: {r.seed: results[r.name]["margins"] for r in runs if r.name in results}
               for arm, runs in arms.items()}
    base_of = {arm: next((f"{r.baseline.rsplit('-s', 1)[0]}" for r in runs if r.baseline), None)
               for arm, runs in arms.items()}
    comparable = [a for a in arms if base_of[a] and set(margins[a]) & set(margins.get(base_of[a], {}))]
    family = len(comparable) * len(s.set_names)
    level = stats.bonferroni_level(max(family, 1))
    rows = []
    for arm, runs in arms.items():
        first = runs[0]
        for name in s.set_names:
            row: dict[str, Any] = {"arm": arm, "set": name, "model": first.model, "corpus": first.corpus or "",
                                   "docs": first.docs, "share": first.share,
                                   "synthetic_from": first.synthetic_from or None, "steps": first.train_steps,
                                   "seeds_planned": len(runs), "seeds_evaluated": len(margins[arm]),
                                   "baseline_arm": base_of[arm] or ""}
            summary = compare.arm_summary(sets[name], margins[arm], name, s.bootstrap)
            if summary:
                row |= {"margin": summary["margin"], "margin_lo": summary["margin_ci95"][0],
                        "margin_hi": summary["margin_ci95"][1]}
            vs = compare.versus(sets[name], margins[arm], margins.get(base_of[arm], {}), name,
                                has_control=s.control_pairs is not None, n_boot=s.bootstrap,
                                adjusted_level=level) if arm in comparable else None
            if vs:
                value, ci, adj = compare.headline(vs)
                row |= {"paired_seeds": len(vs["seeds"]), "margin_shift": vs["margin_diff"],
                        "shift_minus_neutral" if "difference" in vs else "shift": value, "lo": ci[0], "hi": ci[1],
                        "adjusted_lo": adj[0], "adjusted_hi": adj[1]}
            rows.append(row)
    return rows, family, level


def _score_key(rows: list[dict[str, Any]]) -> str:
    return "shift_minus_neutral" if any("shift_minus_neutral" in r for r in rows) else "shift"


def panels(rows: list[dict[str, Any]], x: str, series_keys: tuple[str, ...]) -> dict[str, plots.Series]:
    """{panel: {series: [[x, y, lo, hi]]}}: per probe set, the arm's margin (CI) and its shift vs share 0 (CI); a
    series per distinct value of `series_keys` (`series_label`)."""
    key = _score_key(rows)
    rows = [r for r in rows if r[x] is not None]
    label = series_label(rows, series_keys)
    out: dict[str, plots.Series] = {}
    for r in rows:
        if "margin" in r:
            out.setdefault(f"margin: {r['set']} (nats/token)", {}).setdefault(label(r), []).append(
                [float(r[x]), r["margin"], r["margin_lo"], r["margin_hi"]])
        if key in r:
            title = f"{'shift - neutral shift' if key == 'shift_minus_neutral' else 'shift'} vs 0%: {r['set']}"
            out.setdefault(title, {}).setdefault(label(r), []).append([float(r[x]), r[key], r["lo"], r["hi"]])
    return {t: {k: sorted(v) for k, v in series.items()} for t, series in out.items()}


def series_label(rows: list[dict[str, Any]], keys: tuple[str, ...]):
    """row -> its series' legend label: the values of the keys that vary among `rows` ("welfare, 300 docs"), or, when
    none varies, of all but the model (so one series is "welfare, 300 docs", never "model=model")."""
    shown = [k for k in keys if len({r[k] for r in rows}) > 1] or [k for k in keys if k != "model"]
    words = {"docs": "{} docs", "share": "share {}", "synthetic_from": "documents from step {}"}
    return lambda r: ", ".join(words.get(k, "{}").format(r[k]) for k in shown if r[k] not in (None, ""))


def _with_baselines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Share-0 arms copied into every (model, corpus, docs, synthetic start) series that has an arm with the same
    steps, at share 0."""
    base = [r for r in rows if r["share"] == 0]
    out = [r for r in rows if r["share"] > 0]
    series = {(r["model"], r["corpus"], r["docs"], r["synthetic_from"], r["steps"], r["set"]) for r in out}
    for b in base:
        for model, corpus, docs, start, steps, name in sorted(series, key=str):
            if (model, steps, name) == (b["model"], b["steps"], b["set"]):
                out.append(b | {"corpus": corpus, "docs": docs, "synthetic_from": start})
    return out


def _markdown(run_table: list[dict[str, Any]], arm_table: list[dict[str, Any]], note: str, sweep: Sweep,
              drawn: list[str], not_drawn: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:+.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    key = _score_key(arm_table)
    lines = [f"# Sweep report: {sweep.path.name}", "", f"Budget mode: {sweep.budget}; seeds per arm fixed in the file: "
             f"{list(sweep.seeds)}; {len(run_table)} configured runs, "
             f"{sum(r['status'] == 'done' for r in run_table)} finished and evaluated.", "", note, "",
             "## Arms against the share-0 arm (paired by seed)", "",
             f"| arm | probe set | seeds | margin [95% CI] | {key} [95% CI] | Bonferroni CI |", "|---|---|---|---|---|---|"]
    for r in arm_table:
        margin = f"{fmt(r['margin'])} [{fmt(r['margin_lo'])}, {fmt(r['margin_hi'])}]" if "margin" in r else "missing"
        shift = f"{fmt(r[key])} [{fmt(r['lo'])}, {fmt(r['hi'])}]" if key in r else "-"
        adj = f"[{fmt(r['adjusted_lo'])}, {fmt(r['adjusted_hi'])}]" if key in r else "-"
        lines.append(f"| {r['arm']} | {r['set']} | {r['seeds_evaluated']}/{r['seeds_planned']} | {margin} | {shift} "
                     f"| {adj} |")
    lines += ["", f"Plots: {', '.join(drawn) or 'none'} (plots.json holds what they show).", *not_drawn]
    lines += ["", "## Every configured run", "", "| run | status | share | docs | seed | steps | total tokens | "
              f"synthetic tokens | epochs/doc | {priced.TIME_HEADER} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in run_table:
        epochs = f"{r['epochs_per_doc']:.3f}" if r["epochs_per_doc"] is not None else "-"
        lines.append(f"| {r['run']} | {r['status']} | {r['share']:g} | {r['docs'] or '-'} | {r['seed']} | {r['steps']} "
                     f"| {r['total_tokens']} | {r['synthetic_tokens']} | {epochs} | {priced.time_cell(r)} |")
    return "\n".join(lines) + "\n"


def write(sweep: Sweep, status: Mapping[str, Mapping], results: Mapping[str, Mapping], s: EvalSettings,
          out: storage.Path, est: Any = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    run_table = run_rows(sweep, status, results, est)
    arm_table, family, level = arm_rows(sweep, results, s)
    eval_report.write_table(run_table, out, "runs")
    eval_report.write_table(arm_table, out, "arms")
    with_base = _with_baselines(arm_table)
    figures = {"vs_share.png": (panels(with_base, "share", ("model", "corpus", "docs", "synthetic_from")),
                                f"share of '{sweep.share_component}' in training tokens", False),
               "vs_docs.png": (panels([r for r in arm_table if r["share"] > 0], "docs",
                                      ("model", "corpus", "share", "synthetic_from")),
                               "synthetic documents", True)}
    plotted, not_drawn = {}, []
    for name, (figure, xlabel, integer) in figures.items():
        if plots.draw(figure, xlabel, out / name, lines=True, integer_x=integer, min_x_values=2, dodge=True):
            plotted[name] = figure
        else:
            not_drawn.append(f"{name} is not drawn: every arm has the same {xlabel} "
                             f"({plots.x_values(figure)[0]:g}), one value on its x axis.")
    (out / "plots.json").write_text(json.dumps(plotted, indent=2) + "\n")
    note = compare.family_note(family, s.set_names, level)
    (out / "report.md").write_text(_markdown(run_table, arm_table, note, sweep, list(plotted), not_drawn))
    finished = [str(sweep.run_dir(r)) for r in sweep.runs if r.name in results]
    if finished:
        eval_report.main([*finished, "--out", str(out / "checkpoints"), "--share_component", sweep.share_component])
    return {"runs": run_table, "arms": arm_table, "plots": plotted, "comparisons": family, "adjusted_level": level,
            "note": note}
