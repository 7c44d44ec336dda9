"""sweep.py: the dry-run plan with token budgets computed by hand, the launcher template, and the documented demo
sweep (sweeps/demo.toml, scaled to 2 steps per run) end to end: train, evaluate, report; rerun skips finished runs;
unrun configurations stay in the report."""
import csv
import json
import pathlib
import re
import sys

import numpy as np
import pytest

import sweep
from eval import probe_pairs, probes, stats
from experiments import evaluate, plan, runner

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = "welfare" + " welfare" * 37  # 39 demo-tokenizer tokens (checked below) + EOS = 40 per document


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import tokenizers

    from trainer.demo_assets import demo_asset

    tok = tokenizers.Tokenizer.from_file(demo_asset("tokenizer") + "/tokenizer.json")
    assert len(tok.encode(DOC).ids) == 39  # precondition of the hand-computed numbers
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": DOC}) + "\n" for i in range(12)))
    return path


def _write(path: pathlib.Path, out_dir: pathlib.Path, corpus: pathlib.Path, budget: str, extra: str = "") -> None:
    path.write_text(f'''out_dir = "{out_dir}"
gin_file = ["runs/demo.gin"]
gin = ["BATCH_SIZE = 8", "SEQ_LEN = 128"]
seeds = [0, 1]
shares = [0.0, 0.05, 0.25]
doc_counts = [5, 10]
budget = "{budget}"
{extra}
[corpora]
wel = "{corpus}"
[eval]
pairs = ["eval/probe_sets/animal_welfare.jsonl"]
''')


def _plan_rows(out: str) -> dict[str, list[str]]:
    lines = out.split("\nestimated wall time:")[0].splitlines()[2:]
    return {line.split()[0]: line.split()[1:] for line in lines if not line.startswith("warning:")}


def _warnings(out: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("warning:"):
            arm, note = line.removeprefix("warning: ").split(": ", 1)
            found.setdefault(arm, []).append(note)
    return found


def test_dry_run_fixed_total_tokens(corpus, tmp_path, capsys):
    _write(tmp_path / "s.toml", tmp_path / "out", corpus, "fixed_total_tokens", "train_steps = 25")
    assert sweep.main([str(tmp_path / "s.toml"), "--dry_run", "--no_measure"]) == 0
    out = capsys.readouterr().out
    rows = _plan_rows(out)
    # 200 rows per run are half of one of the demo mixture's 400-row blocks, cut to the run: 5% and 25% of them are
    # whole rows (10 and 50), so no run is warned.
    assert _warnings(out) == {}
    # 25 steps x 8 rows x 128 tokens = 25,600 tokens; 10 documents x 40 tokens = 400 corpus tokens.
    # columns: share docs seed steps total synthetic corpus_tokens epochs est_time baseline
    assert rows["model-wel-n10-w0.25-t25-s1"] == ["0.25", "10", "1", "25", "25600", "6400", "400", "16.0000", "-",
                                                  "model-base-t25-s1"]
    assert "no estimate: no run of this shape has logged a step time yet and measuring here is off" in out
    assert rows["model-wel-n10-w0.05-t25-s0"][4:7] == ["25600", "1280", "400"]
    assert rows["model-wel-n10-w0.05-t25-s0"][7] == "3.2000"
    assert rows["model-wel-n5-w0.25-t25-s0"][5:8] == ["6400", "200", "32.0000"]
    assert rows["model-wel-n5-w0.05-t25-s0"][5:8] == ["1280", "200", "6.4000"]
    assert rows["model-base-t25-s0"][:6] == ["0", "-", "0", "25", "25600", "0"]
    # 2 doc counts x 2 shares x 2 seeds + one share-0 run per seed (shared by every corpus and document count)
    assert len(rows) == 10 and sum(name.startswith("model-base") for name in rows) == 2


def test_dry_run_fixed_synthetic_exposure(corpus, tmp_path, capsys):
    _write(tmp_path / "s.toml", tmp_path / "out", corpus, "fixed_synthetic_exposure", "synthetic_epochs = 4")
    assert sweep.main([str(tmp_path / "s.toml"), "--dry_run", "--no_measure"]) == 0
    out = capsys.readouterr().out
    rows = _plan_rows(out)
    warnings = _warnings(out)
    # Runs shorter than the demo's 20-step warm-up are warned; so are the 5% runs, whose rows hold 5% only roughly:
    # 256 rows (32 steps of 8) hold it as 13 rows, 128 rows as 6.
    steps = {name.rsplit("-s", 1)[0] + "-s*": int(name.split("-t")[1].split("-")[0]) for name in rows}
    assert {arm for arm, notes in warnings.items() if any("warm-up" in n for n in notes)} == {
        arm for arm, n in steps.items() if n < 20}
    assert {arm for arm, notes in warnings.items() if any("whole rows" in n for n in notes)} == {
        "model-wel-n10-w0.05-t32-s*", "model-wel-n5-w0.05-t16-s*"}
    assert "'synthetic' 0.05 as 13 rows (0.05078)" in " ".join(warnings["model-wel-n10-w0.05-t32-s*"])
    # 10 docs: 4 epochs x 400 = 1,600 synthetic tokens. At 25%: 6,400 total -> ceil(6400 / 1024) = 7 steps = 7,168
    # tokens, 1,792 synthetic, 4.48 epochs. At 5%: 32,000 -> 32 steps = 32,768 tokens, 1,638 synthetic, 4.096 epochs.
    assert rows["model-wel-n10-w0.25-t7-s0"][3:8] == ["7", "7168", "1792", "400", "4.4800"]
    assert rows["model-wel-n10-w0.05-t32-s0"][3:8] == ["32", "32768", "1638", "400", "4.0960"]
    # 5 docs: 800 synthetic tokens -> 25%: ceil(3200 / 1024) = 4 steps (4,096 tokens, 1,024 synthetic, 5.12 epochs).
    assert rows["model-wel-n5-w0.25-t4-s1"][3:8] == ["4", "4096", "1024", "200", "5.1200"]
    # A share-0 twin for every distinct step count, so each arm is compared at equal total tokens.
    assert rows["model-wel-n5-w0.25-t4-s1"][8:] == ["-", "model-base-t4-s1"]  # no step time: no estimate
    assert {n for n in rows if n.startswith("model-base")} == {
        f"model-base-t{t}-s{s}" for t in (4, 7, 16, 32) for s in (0, 1)}


def test_bad_sweep_file_names_the_key(corpus, tmp_path, capsys):
    _write(tmp_path / "s.toml", tmp_path / "out", corpus, "fixed_total_tokens", "train_steps = 25\nsheds = [1]")
    assert sweep.main([str(tmp_path / "s.toml"), "--dry_run"]) == 2
    assert "unknown key(s) ['sheds']" in capsys.readouterr().err


def test_a_share_that_gets_no_row_fails_before_anything_runs(corpus, tmp_path, capsys):
    """1% of a 2-step run (16 rows) is no row at all: the sweep file is refused (exit 2, one line naming the arm and
    the binding that allows it) before any run is planned or trained; the binding in the file's gin list allows it."""
    _write(tmp_path / "s.toml", tmp_path / "out", corpus, "fixed_total_tokens", "train_steps = 2")
    text = (tmp_path / "s.toml").read_text().replace("[0.0, 0.05, 0.25]", "[0.0, 0.01]")
    (tmp_path / "s.toml").write_text(text)
    assert sweep.main([str(tmp_path / "s.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs model-wel-n5-w0.01-t2-s*" in err
    assert "'synthetic' 0.01 gets no row in the run: 16 rows per data shard" in err
    assert "MixtureConfig.allow_unrealized_shares = True" in err
    assert not (tmp_path / "out" / "runs").exists()
    (tmp_path / "s.toml").write_text(text.replace('"SEQ_LEN = 128"]', '"SEQ_LEN = 128", '
                                                  '"MixtureConfig.allow_unrealized_shares = True"]'))
    assert sweep.main([str(tmp_path / "s.toml"), "--dry_run", "--no_measure"]) == 0
    assert "'synthetic' 0.01 as 0 rows (0)" in " ".join(_warnings(capsys.readouterr().out)["model-wel-n5-w0.01-t2-s*"])


def test_launcher_template_is_an_argument_list():
    job = runner.Job("a-w0.25-s0", pathlib.Path("/runs/x y"), 10, ("--gin_bindings=MODEL_DIR = '/runs/x y'",))
    cmd = runner.command(job, "python -m launch.tpu run --name {name} --dir={model_dir} -- {cmd}")
    assert cmd == ["python", "-m", "launch.tpu", "run", "--name", "a-w0.25-s0", "--dir=/runs/x y", "--",
                   "python", "train.py", "--gin_bindings=MODEL_DIR = '/runs/x y'"]
    # A name with shell syntax stays one argument; nothing is interpreted.
    evil = runner.Job("x; rm -rf ~", pathlib.Path("/r"), 1, ())
    assert runner.command(evil, "launch {name} {cmd}")[1] == "x; rm -rf ~"
    # {args}: train.py's arguments alone (what launch.tpu takes after `--`).
    assert runner.command(job, "python -m launch.tpu --name={name} -- {args}")[-2:] == [
        "--", "--gin_bindings=MODEL_DIR = '/runs/x y'"]
    with pytest.raises(ValueError, match="exactly once"):
        runner.command(job, "launch --name {name}")
    with pytest.raises(ValueError, match="exactly once"):
        runner.command(job, "launch {cmd} {args}")
    with pytest.raises(ValueError, match="separate word"):
        runner.command(job, "launch --cmd={cmd} {cmd}")
    assert runner.command(job, None)[:2] == [sys.executable, str(REPO / "train.py")]


DOC_FILE = "sweeps/demo.toml"
# Every run 2 steps and one held-out batch, as the docs test scales train.py; the grid, corpora, probe sets and
# statistics stay as documented.
SCALE = [(r"(?m)^train_steps = \d+", "train_steps = 2"), (r"(?m)^heldout_batches = \d+", "heldout_batches = 1")]


def scaled_doc_file(out_dir: pathlib.Path, seeds: str) -> str:
    text = (REPO / DOC_FILE).read_text()
    for pattern, small in [*SCALE, (r"(?m)^out_dir = .*$", f"out_dir = {str(out_dir)!r}"),
                           (r"(?m)^seeds = \[0\]", f"seeds = {seeds}")]:
        text, n = re.subn(pattern, small, text)
        assert n, f"{DOC_FILE}: {pattern!r} no longer matches; update this test's SCALE"
    return text


@pytest.mark.slow  # ~1.5 min on an idle 2-core machine: 3 train.py runs of 2 steps, evaluation, report
def test_documented_sweep_end_to_end(tmp_path, capsys):
    """sweeps/demo.toml as docs/eval.md runs it (tests/test_docs_commands.py leaves that command to this test)."""
    out = tmp_path / "out"
    (tmp_path / "s.toml").write_text(scaled_doc_file(out, "[0]"))
    assert sweep.main([str(tmp_path / "s.toml")]) == 0
    s = evaluate.settings(plan.load(tmp_path / "s.toml").eval)
    sets = dict(zip(s.set_names, s.pairs))
    welfare, lexical = s.set_names  # animal_welfare and its lexical variant
    report = out / "report"
    with open(report / "runs.csv") as f:
        runs = {r["run"]: r for r in csv.DictReader(f)}
    names = ["model-welfare-n300-w0.05-t2-s0", "model-welfare-n300-w0.25-t2-s0", "model-base-t2-s0"]
    assert sorted(runs) == sorted(names) and {r["status"] for r in runs.values()} == {"done"}

    # The table holds the runs' own probe results: the per-pair margins the sweep saved, which are what
    # eval.probes gives for the run's checkpoint (rescored here for one run) and what eval.report reads beside it.
    margins = {n: {k: np.asarray(v) for k, v in json.loads((out / "eval" / f"{n}.json").read_text())["margins"].items()}
               for n in names}
    np.testing.assert_allclose(probes.score_model(out / "runs" / names[1], [probe_pairs.read_pairs(sets[lexical])])[0],
                               margins[names[1]][lexical], atol=1e-6)
    for n in names:
        assert sorted(margins[n]) == sorted(["control", lexical, welfare])
        assert len(margins[n][welfare]) == len(probe_pairs.read_pairs(sets[welfare]))
        for k in sets:
            assert float(runs[n][f"probe/{k}/margin"]) == pytest.approx(margins[n][k].mean(), abs=1e-6)
            saved = json.loads((out / "runs" / n / "eval" / "2" / f"probes-{k}.json").read_text())
            assert saved["overall"]["margin"] == pytest.approx(margins[n][k].mean(), abs=1e-6)
        assert float(runs[n]["heldout/replay/loss"]) > 0
        # its estimate (steps x its logged step time) beside its actual wall time (goodput.json: compile included)
        assert float(runs[n]["actual_time_s"]) > float(runs[n]["est_time_s"]) > 0 < float(runs[n]["goodput"]) < 1

    # Arm comparisons: the paired shift minus the neutral shift against the share-0 arm, with Bonferroni CIs over
    # 2 arms x 2 sets = 4 comparisons.
    arms = json.loads((report / "arms.json").read_text())
    row = next(r for r in arms if r["arm"] == "model-welfare-n300-w0.25-t2" and r["set"] == lexical)
    t, b = margins[names[1]], margins[names[2]]
    expected = stats.shift_minus_control(t[lexical][None], b[lexical][None], t["control"][None],
                                         b["control"][None], paired_runs=True, n_boot=s.bootstrap,
                                         adjusted_level=stats.bonferroni_level(4))
    assert row["shift_minus_neutral"] == pytest.approx(expected["difference"], abs=1e-6)
    assert [row["lo"], row["hi"]] == pytest.approx(expected["difference_ci95"], abs=1e-6)
    assert [row["adjusted_lo"], row["adjusted_hi"]] == pytest.approx(expected["difference_ci_adjusted"], abs=1e-6)
    assert row["adjusted_lo"] <= row["lo"] <= row["hi"] <= row["adjusted_hi"]
    md = (report / "report.md").read_text()
    assert "4 comparisons are reported together" in md and "Bonferroni" in md
    assert all(n in md for n in names)

    # Plots: score vs share with CIs, one point per arm (share 0 included); the PNG exists. One document count is one
    # value on vs_docs.png's x axis: it is not drawn, and report.md says so.
    plotted = json.loads((report / "plots.json").read_text())
    series = plotted["vs_share.png"][f"margin: {welfare} (nats/token)"]["welfare, 300 docs"]
    assert [p[0] for p in series] == [0.0, 0.05, 0.25]
    assert [p[1] for p in series] == pytest.approx([margins[n][welfare].mean() for n in
                                                    (names[2], names[0], names[1])], abs=1e-6)
    shift = plotted["vs_share.png"][f"shift - neutral shift vs 0%: {lexical}"]["welfare, 300 docs"]
    assert shift[-1][1:] == pytest.approx([row["shift_minus_neutral"], row["lo"], row["hi"]], abs=1e-9)
    assert "vs_docs.png" not in plotted and not (report / "vs_docs.png").exists()
    assert "vs_docs.png is not drawn: every arm has the same synthetic documents (300)" in md
    assert (report / "vs_share.png").stat().st_size > 5000

    # Rerun: every run is finished, nothing trains; with a second seed added, the unrun configurations are listed.
    capsys.readouterr()
    assert sweep.main([str(tmp_path / "s.toml")]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 3
    (tmp_path / "s.toml").write_text(scaled_doc_file(out, "[0, 1]"))
    assert sweep.main([str(tmp_path / "s.toml"), "--no_train"]) == 1
    with open(report / "runs.csv") as f:
        status = {r["run"]: r["status"] for r in csv.DictReader(f)}
    assert len(status) == 6 and status["model-welfare-n300-w0.25-t2-s1"] == "not run"
    assert status["model-welfare-n300-w0.25-t2-s0"] == "done"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "sweeps").glob("*.toml")
                                        if not p.name.startswith("durability_")))
def test_every_shipped_sweep_file_dry_runs(path, monkeypatch, capsys, tmp_path, request):
    """Each shipped file plans, as its comments tell the user to run it: from the checkout, with the SmolLM2 folder
    made first (`models.convert gguf-to-hf --out runs/smollm2-135m-instruct`; here the test cache's copy)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval").symlink_to(REPO / "eval")
    if "runs/smollm2-135m-instruct" in (REPO / path).read_text():
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "smollm2-135m-instruct").symlink_to(request.getfixturevalue("smollm2_dir"))
    path = str(REPO / path)
    s = plan.load(path)
    assert sweep.main([path, "--dry_run", "--no_measure"]) == 0
    out = capsys.readouterr().out
    assert s.runs and all(run.name in out for run in s.runs)
