"""bench/demo_experiment.py analyze: device results -> run folders that eval.report reads (one row per run, every
probe set), arm comparisons paired by seed, and the number of comparisons with their Bonferroni intervals."""
import argparse
import csv
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import demo_experiment  # noqa: E402
from eval import probe_pairs  # noqa: E402


def test_analyze_writes_report_rows_comparisons_and_adjusted_intervals(tmp_path):
    sets = {s: len(probe_pairs.read_pairs(demo_experiment.SETS / f"{s}.jsonl"))
            for s in (*demo_experiment.VALUE_SETS, demo_experiment.CONTROL_SET)}
    rng = np.random.default_rng(0)
    runs, results = [], {}
    for seed in range(3):
        for arm, share, push in (("base", 0.0, 0.0), ("welfare", 0.25, 0.1), ("control", 0.25, 0.0)):
            name = f"{arm}_s{seed}"
            runs.append({"name": name, "tag": "", "arm": arm, "seed": seed, "share": share, "steps": 2,
                         "config_gin": f"MIXTURE_WEIGHTS = {{'replay': {1 - share}, 'synthetic': {share}}}\n"})
            margins = {s: (rng.normal(size=n) + (push if s == "animal_welfare" else 0.0)).tolist()
                       for s, n in sets.items()}
            results[name] = {"metrics": [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.5}], "train_seconds": 1.0,
                             "device": "cpu", "margins": margins,
                             "heldout": {"replay": {"loss": 4.8, "target_tokens": 100, "batches": 1}}}
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "manifest.json").write_text(json.dumps({"runs": runs, "probe_sets": list(sets)}))
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "out"
    demo_experiment.analyze(argparse.Namespace(results=[tmp_path / "results.json"], prep=[prep],
                                               runs=tmp_path / "runs", out=out))

    with open(out / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(results)
    for s in sets:
        assert all(r[f"probe/{s}/margin"] for r in rows), s
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparisons"] == 3 * len(demo_experiment.VALUE_SETS)
    for pair in ("welfare_vs_base", "welfare_vs_control", "control_vs_base"):
        assert summary[pair]["seeds"] == [0, 1, 2]
        for s in demo_experiment.VALUE_SETS:
            c = summary[pair][s]
            assert c["difference_ci_adjusted"][0] < c["difference_ci95"][0] <= c["difference"]
            assert c["difference"] <= c["difference_ci95"][1] < c["difference_ci_adjusted"][1]
    shifted = summary["welfare_vs_base"]["animal_welfare"]["margin_diff"]
    assert abs(shifted - 0.1) < 0.1  # the pushed set moves by about the push
