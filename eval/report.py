"""One table and a few plots across checkpoints and runs.

    python -m eval.report RUN_DIR... [--out DIR] [--share_component synthetic]

Run directories and DIR may be local or gs://.

For every run directory it reads metrics.jsonl (training log), config.gin (the mixture weights; a run trained
without `--share_component`, e.g. an SFT run, takes the share of the run its INIT_FROM came from) and the eval results
saved beside each checkpoint (docs/eval.md): MODEL_DIR/eval/<step>/{probes-*.json, heldout.json, anima.json}; for
the periodic exports MODEL_DIR/exports/<step>, MODEL_DIR/eval/exports/<step>/; for the final export MODEL_DIR/hf,
MODEL_DIR/eval/hf/. It writes DIR/report.csv and DIR/report.json (one row per run x checkpoint) and PNG plots:
probe score and held-out loss against step (one line per run) and against the mixture share of `--share_component`
across runs (final checkpoints), with 95% CIs, and, for runs that scored probes in the loop (TrainConfig.probe_sets,
MODEL_DIR/probes.jsonl), each set's margin and its shift minus the control set's against step 0, at every scored step.
"""
from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import storage
from eval import loading, stats
from trainer import metrics_file

PROBE_PREFIX = "probes-"
HF = "hf"


def read_metrics(run_dir: storage.Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of records sorted by step; a malformed record is an error naming it."""
    path = run_dir / "metrics.jsonl"
    records = metrics_file.read(path)
    for i, rec in enumerate(records, 1):
        if not isinstance(rec["step"], int):
            raise ValueError(f"{path}: record {i}: 'step' must be an integer, got {rec['step']!r}")
    return sorted(records, key=lambda r: r["step"])


def gin_macro(run_dir: storage.Path, name: str) -> Any:
    """The value of macro `name` in the run's operative config.gin (None when the file or the macro is absent); a
    dict literal may span lines."""
    path = run_dir / "config.gin"
    if not path.is_file():
        return None
    text = path.read_text()
    match = re.search(rf"^{name}\s*=\s*(\\\n\s*)?", text, re.MULTILINE)
    if not match:
        return None
    start, end = match.end(), text.find("\n", match.end())
    if text.startswith("{", start):  # read to the closing brace
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                end += 1
                break
    try:
        return ast.literal_eval(text[start:end if end >= 0 else len(text)].strip())
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read {name}: {e}") from e


def mixture_weights(run_dir: storage.Path) -> dict[str, float]:
    """The normalized MIXTURE_WEIGHTS macro of the run's operative config.gin ({} when absent)."""
    weights = gin_macro(run_dir, "MIXTURE_WEIGHTS")
    if weights is None:
        return {}
    if not isinstance(weights, dict):
        raise ValueError(f"{run_dir / 'config.gin'}: MIXTURE_WEIGHTS is not a dict literal")
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()} if total else {}


def parent_run(run_dir: storage.Path) -> storage.Path | None:
    """The docmix run a run started from: its INIT_FROM when that is a run directory, or the run's hf/,
    exports/<step>/ or checkpoints/<step>/ folder; None when it started from anything else (or from scratch)."""
    init = gin_macro(run_dir, "INIT_FROM")
    if not isinstance(init, str) or not init:
        return None
    path = storage.absolute(init)
    options = [path] + [path.parent] * (path.name == HF) + \
        [path.parent.parent] * (path.parent.name in (loading.EXPORTS, "checkpoints"))
    return next((c for c in options if c != run_dir and (c / "config.gin").is_file()), None)


def run_share(run_dir: storage.Path, component: str) -> tuple[float | None, storage.Path]:
    """(share of `component` in the training of the run's model, the run that gave it): the run's own weight when
    positive, else that of the run it started from (`parent_run`, followed back), else 0.0 (an SFT run of a 5% model
    is at 0.05, not 0). None when the run's config.gin has no MIXTURE_WEIGHTS."""
    weights = mixture_weights(run_dir)
    if not weights:
        return None, run_dir
    chain, current = [run_dir], run_dir
    while weights.get(component, 0.0) <= 0 and (parent := parent_run(current)) and parent not in chain:
        chain.append(parent)
        current, parent_weights = parent, mixture_weights(parent)
        if parent_weights.get(component, 0.0) > 0:
            return parent_weights[component], parent
    return weights.get(component, 0.0), run_dir


def _checkpoints(run_dir: storage.Path, last_step: int | None) -> list[tuple[str, int | None, storage.Path]]:
    """(label, step, results folder) for every checkpoint with saved results: eval/<step>/, the periodic exports'
    eval/exports/<step>/ (labelled exports/<step>) and the hf export."""
    eval_dir = run_dir / loading.RESULTS
    found = []
    for prefix, folder in (("", eval_dir), (f"{loading.EXPORTS}/", eval_dir / loading.EXPORTS)):
        if folder.is_dir():
            found += [(prefix + d.name, int(d.name), d) for d in folder.iterdir() if d.is_dir() and d.name.isdigit()]
    found.sort(key=lambda x: (x[1], x[0]))
    if (eval_dir / HF).is_dir():
        found.append((HF, last_step, eval_dir / HF))
    return found


def checkpoint_row(results: storage.Path) -> dict[str, Any]:
    """Flat columns of one checkpoint's saved results."""
    row: dict[str, Any] = {}
    for path in sorted(results.glob(f"{PROBE_PREFIX}*.json")):
        name = path.stem[len(PROBE_PREFIX):]
        overall = storage.read_json_object(path)["overall"]
        row[f"probe/{name}/accuracy"] = overall["accuracy"]
        row[f"probe/{name}/margin"] = overall["margin"]
        row[f"probe/{name}/margin_lo"], row[f"probe/{name}/margin_hi"] = overall["ci95"]["margin"]
        row[f"probe/{name}/accuracy_lo"], row[f"probe/{name}/accuracy_hi"] = overall["ci95"]["accuracy"]
        row[f"probe/{name}/n"] = overall["n"]
    if (results / "heldout.json").is_file():
        for comp, r in storage.read_json_object(results / "heldout.json")["components"].items():
            row[f"heldout/{comp}/loss"] = r["loss"]
            row[f"heldout/{comp}/tokens"] = r["target_tokens"]
    if (results / "anima.json").is_file():
        anima = storage.read_json_object(results / "anima.json")
        for key in ("overall_mean", "dimension_normalized_avg"):
            if isinstance(anima.get(key), (int, float)):
                row[f"anima/{key}"] = anima[key]
    return row


def _train_metrics(metrics: list[dict[str, Any]], step: int | None) -> dict[str, Any]:
    """Numeric scalars of the last training record at or before `step`, prefixed `train/`."""
    before = [m for m in metrics if step is None or m["step"] <= step]
    if not before:
        return {}
    return {f"train/{k}": v for k, v in before[-1].items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect(run_dirs: Sequence[storage.PathLike], share_component: str) -> list[dict[str, Any]]:
    """One row per run x checkpoint with results: run, checkpoint, step, share, train/*, probe/*, heldout/*, anima/*."""
    rows = []
    for run in run_dirs:
        run_dir = storage.absolute(run)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        metrics = read_metrics(run_dir)
        last_step = metrics[-1]["step"] if metrics else None
        checkpoints = _checkpoints(run_dir, last_step)
        if not checkpoints and not metrics:
            raise ValueError(f"{run_dir}: neither metrics.jsonl nor saved eval results (see docs/eval.md)")
        share, source = run_share(run_dir, share_component)
        for label, step, results in checkpoints:
            rows.append({"run": run_dir.name, "run_dir": str(run_dir), "checkpoint": label, "step": step,
                         "share": share, **({"share_from": source.name} if source != run_dir else {}),
                         **_train_metrics(metrics, step), **checkpoint_row(results)})
    return rows


def in_loop_panels(run_dirs: Sequence[storage.PathLike], n_boot: int = stats.DEFAULT_RESAMPLES
                   ) -> dict[str, dict[str, list[list[float]]]]:
    """{panel: {run: [[step, y, lo, hi], ...]}} of the runs' in-loop probes (MODEL_DIR/probes.jsonl): each set's mean
    margin, and each value set's shift minus the control set's shift against step 0, with 95% bootstrap CIs over the
    pairs (eval.stats, as eval.probes computes them for a checkpoint)."""
    from trainer import probes_in_loop

    panels: dict[str, dict[str, list[list[float]]]] = {}
    for run in run_dirs:
        run_dir = storage.absolute(run)
        records = probes_in_loop.read(run_dir)
        start = next((r for r in records if r["step"] == 0), None)
        for r in records:
            for name, margins in r["margins"].items():
                s = stats.summarize(np.asarray(margins), n_boot=n_boot)
                panels.setdefault(f"margin (in loop): {name} (nats/token)", {}).setdefault(run_dir.name, []).append(
                    [float(r["step"]), s["margin"], *s["ci95"]["margin"]])
                control = r.get("control")
                if start is None or control is None or name == control or name not in start["margins"]:
                    continue
                d = stats.shift_minus_control(*(np.asarray(m) for m in (
                    margins, start["margins"][name], r["margins"][control], start["margins"][control])), n_boot=n_boot)
                panels.setdefault(f"shift - control shift vs step 0 (in loop): {name}", {}).setdefault(
                    run_dir.name, []).append([float(r["step"]), d["difference"], *d["difference_ci95"]])
    return panels


def write_table(rows: list[dict[str, Any]], out_dir: storage.PathLike, name: str = "report"
                ) -> tuple[storage.Path, storage.Path]:
    """out_dir/<name>.csv (columns in first-seen order, blank where a row has no value) and out_dir/<name>.json."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out_dir = storage.Path(out_dir)
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    csv_path.write_bytes(text.getvalue().encode())
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    return csv_path, json_path


def missing_data(rows: list[dict[str, Any]], plotted: dict[str, dict], out: storage.Path,
                 in_loop: Sequence[str] = ()) -> list[str]:
    """What the report lacks: probe results in every run (saved beside a checkpoint or scored in the loop: the runs
    `in_loop`), and data in each plot."""
    warnings = []
    without = sorted({r["run"] for r in rows} - {r["run"] for r in rows if any(k.startswith("probe/") for k in r)}
                     - set(in_loop))
    if without or not (rows or in_loop):
        warnings.append(f"no probe results for {', '.join(without) or 'any run'}; run `python -m eval.probes --model "
                        "RUN --pairs FILE` first (results are saved beside each checkpoint, docs/eval.md)")
    warnings += [f"{out / name} has no data to plot" for name, panels in plotted.items() if not panels]
    return warnings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="run directories (MODEL_DIR of each run)")
    p.add_argument("--out", default="report", help="output folder for report.csv/json, plots.json and PNGs")
    p.add_argument("--share_component", default="synthetic", help="mixture component whose share is the x axis")
    p.add_argument("--loss_key", default="loss", help="metrics.jsonl key of the training loss curve")
    args = p.parse_args(argv)
    from eval import plots

    rows = collect(args.run_dirs, args.share_component)
    out = storage.absolute(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = write_table(rows, out)
    curves = {storage.absolute(r).name: [(m["step"], m[args.loss_key]) for m in read_metrics(storage.absolute(r))
                                                if isinstance(m.get(args.loss_key), (int, float))
                                                and math.isfinite(m[args.loss_key])]
              for r in args.run_dirs}
    drawn = {
        "vs_step.png": plots.against_step(rows, out / "vs_step.png"),
        "vs_share.png": plots.against_share(rows, args.share_component, out / "vs_share.png"),
        "training_loss.png": plots.training_curves(curves, out / "training_loss.png"),
    }
    in_loop = in_loop_panels(args.run_dirs)
    if in_loop:
        plots.draw(in_loop, "step", out / "in_loop_probes.png", lines=True, integer_x=True)
        drawn["in_loop_probes.png"] = in_loop
    plotted = {name: panels for name, panels in drawn.items() if panels is not None}
    (out / "plots.json").write_text(json.dumps(plotted, indent=2) + "\n")
    warnings = [f"{out / name} not drawn: every run plotted has the same {args.share_component!r} share (one value "
                "on its x axis)" for name, panels in drawn.items() if panels is None]
    probed = [run for series in in_loop.values() for run in series]
    for warning in warnings + missing_data(rows, plotted, out, probed):
        print(f"python -m eval.report: warning: {warning}", file=sys.stderr)
    print(f"{len(rows)} rows -> {csv_path}, {json_path}; plots: {', '.join(str(out / k) for k in plotted)}")
    return {"rows": rows, "plots": plotted}


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m eval.report"))
