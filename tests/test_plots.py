"""Every plot the project makes, with one and with several values on each axis, read off the matplotlib Axes that
were saved: axis ranges and ticks, the y=0 line of signed panels, legends outside the axes, series labels, figures
across runs that are not drawn when their x axis would hold one value, and the x positions of durability arms."""
import json
import pathlib

import matplotlib.figure
from matplotlib.backends.backend_agg import FigureCanvasAgg
import numpy as np
import pytest

from eval import plots, probes, report
from eval.probe_pairs import Pair
from experiments import durability_report, evaluate, plan, sweep_report

REPO = pathlib.Path(__file__).resolve().parents[1]
PAIRS = [Pair("p", "c", "r", "x"), Pair("q", "c", "r", "y"), Pair("s", "c", "r", "y")]


@pytest.fixture
def saved(monkeypatch) -> dict[str, matplotlib.figure.Figure]:
    """"folder/file name" -> the Figure saved there (its Axes stay readable after pyplot closes it)."""
    figures = {}
    original = plots.save

    def keep(fig, path):
        figures[f"{pathlib.Path(path).parent.name}/{pathlib.Path(path).name}"] = fig
        return original(fig, path)

    monkeypatch.setattr(plots, "save", keep)
    return figures


def panels_of(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


def has_zero_line(ax) -> bool:
    return any(list(line.get_ydata()) == [0, 0] and list(line.get_xdata()) == [0, 1] for line in ax.get_lines())


def assert_legend_outside(fig) -> None:
    renderer = FigureCanvasAgg(fig).get_renderer()  # pyplot detached the figure from its canvas when closing it
    assert len(fig.legends) == 1
    box = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not ax.get_window_extent(renderer).overlaps(box), ax.get_title()


def _run(root: pathlib.Path, name: str, gin: str, margins: dict[int, list[float]]) -> pathlib.Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 100}) + "\n"
                                               for s in range(0, max(margins) + 1, 5)))
    (run / "config.gin").write_text(gin)
    for step, m in margins.items():
        d = run / "eval" / str(step)
        d.mkdir(parents=True)
        (d / "probes-welfare.json").write_text(json.dumps(probes.report(PAIRS, np.array(m), n_boot=100)))
        (d / "heldout.json").write_text(json.dumps({"components": {"replay": {"loss": 4.0 - step / 100,
                                                                              "target_tokens": 100}}}))
    return run


def weights(share: float) -> str:
    return f"MIXTURE_WEIGHTS = {{'replay': {1 - share}, 'synthetic': {share}}}\n"


def test_eval_report_with_one_checkpoint_and_one_share(tmp_path, saved, capsys):
    """One run, one checkpoint at step 20: the step axis is that step as its only tick (no 19.00-21.00 of
    quarter steps), probe panels have a y=0 line and loss panels none, the legend is outside the axes; vs_share.png
    (one share) is not drawn and the report says so."""
    run = _run(tmp_path, "w5", weights(0.05), {20: [0.1, -0.2, 0.3]})
    out = tmp_path / "out"
    result = report.main([str(run), "--out", str(out)])
    axes = panels_of(saved["out/vs_step.png"])
    margin, held = axes["probe margin: welfare (nats/token)"], axes["held-out loss: replay"]
    for ax in (margin, held):
        assert ax.get_xlim() == (18.0, 22.0) and list(ax.get_xticks()) == [20.0]
    assert has_zero_line(margin) and not has_zero_line(held)
    lo, hi = margin.get_ylim()
    assert lo < -0.2 and hi > 0.3  # the CI [-0.2, 0.3] and the zero line are in view
    assert_legend_outside(saved["out/vs_step.png"])
    loss = panels_of(saved["out/training_loss.png"])["training loss"]  # logged every 5 steps: integer step ticks
    assert all(t == int(t) for t in loss.get_xticks()) and not has_zero_line(loss)
    assert "out/vs_share.png" not in saved and not (out / "vs_share.png").exists()
    assert "vs_share.png" not in result["plots"]
    assert "vs_share.png not drawn: every run plotted has the same 'synthetic' share" in capsys.readouterr().err


def test_eval_report_with_several_checkpoints_and_shares(tmp_path, saved):
    runs = [_run(tmp_path, f"w{int(s * 100)}_s{k}", weights(s), {10: [s, s - 0.1, s + 0.2], 25: [2 * s, 0.1, 0.2]})
            for s in (0.0, 0.05, 0.25) for k in (0, 1)]
    report.main([str(r) for r in runs] + ["--out", str(tmp_path / "out")])
    step = panels_of(saved["out/vs_step.png"])["probe margin: welfare (nats/token)"]
    lo, hi = step.get_xlim()
    assert lo <= 10 and hi >= 25 and all(t == int(t) for t in step.get_xticks())
    assert has_zero_line(step)
    share = panels_of(saved["out/vs_share.png"])
    lo, hi = share["probe margin: welfare (nats/token)"].get_xlim()
    assert lo <= 0.0 and hi >= 0.25 and has_zero_line(share["probe margin: welfare (nats/token)"])
    assert not has_zero_line(share["held-out loss: replay"])
    assert [t.get_text() for t in saved["out/vs_share.png"].legends[0].get_texts()] == ["w0", "w5", "w25"]
    assert_legend_outside(saved["out/vs_share.png"])


def test_an_sft_run_is_placed_at_the_share_of_the_model_it_started_from(tmp_path):
    """An SFT run's own mixture has no synthetic component; its INIT_FROM is the 5% midtraining run's export, so its
    share is 0.05 (not 0.0, on top of the 0% run), and the row says which run gave it."""
    mid = _run(tmp_path, "mid_w5", weights(0.05), {20: [0.1, 0.2, 0.3]})
    base = _run(tmp_path, "mid_w0", weights(0.0), {20: [0.1, 0.2, 0.3]})
    sft = _run(tmp_path, "sft_of_w5", f"INIT_FROM = '{mid / 'hf'}'\nMIXTURE_WEIGHTS = {{'sft': 1.0}}\n", {8: [0.0] * 3})
    sft0 = _run(tmp_path, "sft_of_w0", f"INIT_FROM = '{base / 'exports' / '20'}'\nMIXTURE_WEIGHTS = {{'sft': 1.0}}\n",
                {8: [0.0] * 3})
    rows = {r["run"]: r for r in report.collect([mid, sft, sft0], "synthetic")}
    assert rows["sft_of_w5"]["share"] == 0.05 and rows["sft_of_w5"]["share_from"] == "mid_w5"
    assert rows["sft_of_w0"]["share"] == 0.0 and rows["mid_w5"]["share"] == 0.05 and "share_from" not in rows["mid_w5"]


def _sweep(tmp_path: pathlib.Path, doc_counts: list[int]) -> tuple[plan.Sweep, dict, evaluate.EvalSettings]:
    """A planned sweep (shares 0, 0.05, 0.25 x `doc_counts`, one seed) and per-pair margins for every run."""
    s = evaluate.EvalSettings(pairs=(REPO / "eval/probe_sets/animal_welfare.jsonl",),
                              control_pairs=REPO / "eval/probe_sets/neutral_control.jsonl", bootstrap=100)
    sizes = {name: len(p) for name, p in s.read_sets().items()}
    runs, results = [], {}
    rng = np.random.default_rng(0)
    for share in (0.0, 0.05, 0.25):
        for docs in ([None] if share == 0 else doc_counts):
            name = f"model-base-t20-s0" if share == 0 else f"model-welfare-n{docs}-w{share}-t20-s0"
            runs.append(plan.Run(name, "model", None if share == 0 else "welfare", docs, share, 0, 20, 1024, 20480,
                                 round(share * 20480), None, None, (), (), None if share == 0 else "model-base-t20-s0"))
            results[name] = {"margins": {k: list(rng.normal(share + (docs or 0) / 1000, 0.3, n)) for k, n in
                                         sizes.items()}}
            (tmp_path / "runs" / name).mkdir(parents=True)
            (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"step": 20, "loss": 3.0}\n')
    sweep = plan.Sweep(tmp_path / "s.toml", tmp_path, "fixed_total_tokens", (0,), (0.0, 0.05, 0.25), "synthetic",
                       tuple(runs), None)
    return sweep, results, s


@pytest.mark.parametrize("doc_counts", [[300], [100, 300]])
def test_sweep_plots_with_one_and_several_document_counts(tmp_path, saved, doc_counts):
    """vs_share.png: shares 0..0.25 in every panel (shared x axis), a y=0 line on margin and shift panels, one series
    per document count labelled by what varies ("welfare, 300 docs" when nothing does; never "model=model"). vs_docs:
    one document count is one x value, so it is not drawn and report.md says why; two are drawn."""
    sweep, results, s = _sweep(tmp_path, doc_counts)
    status = {r.name: {"status": "done"} for r in sweep.runs}
    out = sweep_report.write(sweep, status, results, s, tmp_path / "report")
    fig = saved["report/vs_share.png"]
    for title, ax in panels_of(fig).items():
        lo, hi = ax.get_xlim()
        assert lo < 0 and hi > 0.25 and has_zero_line(ax), title
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ([f"{n} docs" for n in doc_counts] if len(doc_counts) > 1 else ["welfare, 300 docs"])
    assert_legend_outside(fig)
    md = (tmp_path / "report" / "report.md").read_text()
    if len(doc_counts) == 1:
        assert "report/vs_docs.png" not in saved and "vs_docs.png" not in out["plots"]
        assert "vs_docs.png is not drawn: every arm has the same synthetic documents (300)" in md
    else:
        docs = panels_of(saved["report/vs_docs.png"])
        for ax in docs.values():
            lo, hi = ax.get_xlim()
            assert lo < 100 and hi > 300 and has_zero_line(ax)
        legend = saved["report/vs_docs.png"].legends[0]
        assert [t.get_text() for t in legend.get_texts()] == ["share 0.05", "share 0.25"]
        assert "Plots: vs_share.png, vs_docs.png" in md


def test_durability_arms_share_x_positions_and_one_point_has_a_sensible_axis(tmp_path, saved):
    """The preservation arm's j-th point came after more SFT steps (22 and 36 conversations) than the others' (16 and
    33); arms are compared at the same point, so it is drawn at the base arm's counts (its own stay in the table).
    Shift panels hold no base series: the zero line is the base arm."""
    table = []
    for arm, xs in (("base", [0, 16, 33]), ("document", [0, 16, 33]), ("preservation", [0, 22, 36])):
        for j, x in enumerate(xs):
            row = {"arm": arm, "point": j, "set": "welfare", "status": "evaluated", "samples": x, "margin": 0.1,
                   "margin_lo": 0.0, "margin_hi": 0.2}
            table.append(row if arm == "base" else row | {"vs_base": 0.01 * j, "lo": -0.02, "hi": 0.05})
    panels = durability_report.curve_panels(table, has_control=True)
    shift = panels["shift - neutral shift vs base arm: welfare"]
    assert sorted(shift) == ["document", "preservation"]
    assert [p[0] for p in shift["preservation"]] == [p[0] for p in shift["document"]] == [0, 16, 33]
    durability_report.plots.draw(panels, "samples", tmp_path / "curve.png", lines=True, integer_x=True, dodge=True)
    for ax in saved[f"{tmp_path.name}/curve.png"].axes:
        assert has_zero_line(ax) and all(t == int(t) for t in ax.get_xticks())
        centers = sorted({round(float(x), 6) for line in ax.get_lines()[1:] for x in line.get_xdata()})
        assert len(centers) > 3 and max(centers) - min(centers) < 36  # arms side by side around 0, 16 and 33
    one = durability_report.curve_panels([r for r in table if r["point"] == 0], has_control=True)
    durability_report.plots.draw(one, "samples", tmp_path / "one.png", lines=True, integer_x=True, dodge=True)
    for ax in saved[f"{tmp_path.name}/one.png"].axes:
        assert ax.get_xlim() == (-1.0, 1.0) and list(ax.get_xticks()) == [0.0] and has_zero_line(ax)
