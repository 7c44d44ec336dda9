"""eval.report on two small runs: the CSV/JSON table's rows and values, and PNGs that decode and hold the data."""
import csv
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from eval import probes, report, stats
from eval.probe_pairs import Pair

PAIRS = [Pair("p", "c", "r", "x"), Pair("q", "c", "r", "y"), Pair("s", "c", "r", "y")]


def _make_run(root: pathlib.Path, name: str, share: float, margins: dict[int, list[float]], held: dict[int, float],
              anima: float | None) -> pathlib.Path:
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s / 100 - share, "lr": 1e-3, "tag": "x"}) + "\n"
        for s in range(0, 101, 10)))
    # Operative config: the dict may be written over several lines.
    (run / "config.gin").write_text(f"SEED = 0\nMIXTURE_WEIGHTS = \\\n    {{'replay': {1 - share},\n"
                                    f"     'synthetic': {share}}}\nTRAIN_STEPS = 100\n")
    for step, m in margins.items():
        d = run / "eval" / str(step)
        d.mkdir(parents=True)
        (d / "probes-welfare.json").write_text(json.dumps(probes.report(PAIRS, np.array(m), n_boot=200)))
        (d / "heldout.json").write_text(json.dumps(
            {"components": {"general": {"loss": held[step], "target_tokens": 1000}}}))
    if anima is not None:
        (run / "eval" / "hf").mkdir(parents=True)  # a run's export's results: MODEL_DIR/eval/hf (eval.loading)
        (run / "eval" / "hf" / "anima.json").write_text(
            json.dumps({"overall_mean": anima, "dimension_normalized_avg": 0.4}))
    return run


@pytest.fixture
def runs(tmp_path):
    a = _make_run(tmp_path, "share0", 0.0, {50: [0.1, -0.2, 0.3], 100: [0.2, 0.1, 0.3]}, {50: 4.0, 100: 3.5}, 0.3)
    b = _make_run(tmp_path, "share25", 0.25, {100: [0.5, 0.4, 0.6]}, {100: 3.7}, None)
    return [a, b]


def test_table_rows_and_values(runs, tmp_path):
    out = tmp_path / "out"
    result = report.main([str(r) for r in runs] + ["--out", str(out)])
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["checkpoint"], r["step"]) for r in rows] == [
        ("share0", "50", "50"), ("share0", "100", "100"), ("share0", "hf", "100"), ("share25", "100", "100")]
    assert json.loads((out / "report.json").read_text()) == result["rows"]
    r50, r100, hf, b100 = rows
    assert float(r50["share"]) == 0.0 and float(b100["share"]) == 0.25
    assert float(r50["probe/welfare/margin"]) == pytest.approx(0.2 / 3)
    assert float(r50["probe/welfare/accuracy"]) == pytest.approx(2 / 3)
    assert float(b100["probe/welfare/margin"]) == pytest.approx(0.5)
    lo, mid, hi = (float(r50[f"probe/welfare/{k}"]) for k in ("margin_lo", "margin", "margin_hi"))
    assert lo <= mid <= hi
    assert float(r50["heldout/general/loss"]) == 4.0 and float(b100["heldout/general/loss"]) == 3.7
    # Training metrics: the last logged record at or before the checkpoint's step; non-numeric fields dropped.
    assert float(r50["train/loss"]) == pytest.approx(4.5) and float(b100["train/loss"]) == pytest.approx(3.75)
    assert "train/tag" not in r50
    assert float(hf["anima/overall_mean"]) == 0.3 and hf["probe/welfare/margin"] == ""


def _colored_pixels(path: pathlib.Path) -> int:
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    spread = img.max(-1) - img.min(-1)  # gray/black/white text and axes have spread ~0; plotted lines are colored
    return int((spread > 60).sum())


def test_periodic_exports_results_are_rows_at_their_step(runs, tmp_path):
    """MODEL_DIR/eval/exports/<step>/ (eval.loading.results_dir of MODEL_DIR/exports/<step>) is a row at that step."""
    d = runs[1] / "eval" / "exports" / "50"
    d.mkdir(parents=True)
    (d / "probes-welfare.json").write_text(json.dumps(probes.report(PAIRS, np.array([0.7, 0.8, 0.9]), n_boot=200)))
    rows = report.collect([runs[1]], "synthetic")
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("exports/50", 50), ("100", 100)]
    assert rows[0]["probe/welfare/margin"] == pytest.approx(0.8)


def test_plots_hold_the_data(runs, tmp_path):
    out = tmp_path / "out"
    result = report.main([str(r) for r in runs] + ["--out", str(out)])
    plotted = json.loads((out / "plots.json").read_text())
    assert plotted == result["plots"]
    step = plotted["vs_step.png"]
    welfare = step["probe margin: welfare (nats/token)"]
    np.testing.assert_allclose([p[:2] for p in welfare["share0"]], [[50, 0.2 / 3], [100, 0.2]])
    np.testing.assert_allclose([p[:2] for p in welfare["share25"]], [[100, 0.5]])
    assert all(lo <= y <= hi for _, y, lo, hi in welfare["share0"])
    assert step["held-out loss: general"]["share0"] == [[50, 4.0, 4.0, 4.0], [100, 3.5, 3.5, 3.5]]
    share = plotted["vs_share.png"]
    # Final checkpoints against share: share0's eval/100 and hf export (also step 100) are merged.
    margin = share["probe margin: welfare (nats/token)"]
    np.testing.assert_allclose([p[:2] for p in margin["share0"]] + [p[:2] for p in margin["share25"]],
                               [[0.0, 0.2], [0.25, 0.5]])
    held = share["held-out loss: general"]
    assert held["share0"][0][:2] == [0.0, 3.5] and held["share25"][0][:2] == [0.25, 3.7]
    assert share["ANIMA overall_mean"] == {"share0": [[0.0, 0.3, 0.3, 0.3]]}
    curves = plotted["training_loss.png"]["training loss"]
    assert len(curves["share0"]) == 11
    np.testing.assert_allclose(curves["share25"][-1][:2], [100, 3.75])
    for name in ("vs_step.png", "vs_share.png", "training_loss.png"):
        path = out / name
        assert path.stat().st_size > 5000
        with Image.open(path) as img:
            img.verify()
        assert _colored_pixels(path) > 200, name


def test_bad_metrics_line_is_named(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"loss": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: record lacks \['step'\]"):
        report.main([str(run), "--out", str(tmp_path / "o")])


def test_arm_name_strips_seed_suffix():
    from eval.plots import arm_name

    assert arm_name("welfare_s12") == "welfare" and arm_name("base-seed3") == "base" and arm_name("share25") == "share25"


def test_report_without_probe_results_warns(runs, tmp_path, capsys):
    """A run that was never probed (and a report with nothing to plot against share) is named, not drawn silently."""
    for path in runs[1].glob("eval/*/probes-*.json"):
        path.unlink()
    report.main([str(r) for r in runs] + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "no probe results for share25" in err and "share0" not in err.split("no probe results")[1].split("\n")[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    report.main([str(bare), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert "no probe results for any run" in err and "vs_share.png has no data to plot" in err


def test_in_loop_probes_are_plotted_against_step(tmp_path, capsys):
    """A run that scored its probes in the loop (probes.jsonl, trainer.probes_in_loop) needs no saved results: its
    margins and shifts minus the control's against step 0 are drawn at every scored step, with the CIs eval.stats
    gives for those margins."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0}) + "\n" for s in (1, 2, 3, 4)))
    margins = {0: ([0.0, 0.1, -0.1], [0.0, 0.0]), 2: ([0.2, 0.3, 0.0], [0.1, 0.0]), 4: ([0.4, 0.5, 0.1], [0.0, 0.1])}
    (run / "probes.jsonl").write_text("".join(json.dumps(
        {"step": s, "margins": {"welfare": w, "neutral": c}, "control": "neutral"}) + "\n" for s, (w, c) in
        margins.items()))
    result = report.main([str(run), "--out", str(tmp_path / "o")])
    assert "no probe results" not in capsys.readouterr().err
    panels = result["plots"]["in_loop_probes.png"]
    margin = panels["margin (in loop): welfare (nats/token)"]["run"]
    assert [p[0] for p in margin] == list(margins)
    assert [p[1] for p in margin] == pytest.approx([np.mean(w) for w, _ in margins.values()])
    assert margin[1][2:] == stats.summarize(np.array(margins[2][0]))["ci95"]["margin"]
    shift = panels["shift - control shift vs step 0 (in loop): welfare"]["run"]
    want = stats.shift_minus_control(*(np.array(m) for m in (margins[4][0], margins[0][0], margins[4][1],
                                                             margins[0][1])))
    assert shift[-1] == pytest.approx([4, want["difference"], *want["difference_ci95"]])
    assert "shift - control shift vs step 0 (in loop): neutral" not in panels  # the control has no shift of its own
    assert _colored_pixels(tmp_path / "o" / "in_loop_probes.png") > 500
