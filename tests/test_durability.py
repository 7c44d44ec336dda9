"""experiments.durability on the documented demo file (sweeps/durability_demo.toml, as docs/eval.md runs it), scaled
like the docs test scales train.py: every arm trained and fine-tuned, every point evaluated, and a report whose curve
holds the points' probe results (checked against an independent scoring and eval.stats). tests/test_docs_commands.py
leaves that documented command to this test."""
import functools
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from eval import probes, stats
from experiments import durability, durability_plan, durability_run
from trainer import probes_in_loop

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC_FILE = "sweeps/durability_demo.toml"
ARMS = ["base", "document", "control", "instruction", "preservation"]
# Every stage 2 steps; SFT over 16 conversations with a probe point every 8 (two points after the start). The arms,
# corpora, model, probe sets and statistics stay as documented.
SCALE = [(r"(?m)^train_steps = \d+", "train_steps = 2"), (r"(?m)^samples = \d+", "samples = 16"),
         (r"(?m)^eval_every = \d+", "eval_every = 8")]


def scaled_doc_file(out_dir: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    text = (REPO / DOC_FILE).read_text()
    for pattern, small in [*SCALE, (r"(?m)^out_dir = .*$", f"out_dir = {str(out_dir)!r}")]:
        text, n = re.subn(pattern, small, text)
        assert n, f"{DOC_FILE}: {pattern!r} no longer matches; update this test's SCALE"
    path.write_text(text)
    return path


def sft_disk(out: pathlib.Path) -> int:
    """Bytes under the general SFT runs' folders."""
    return sum(p.stat().st_size for run in (out / "runs").glob("*-sft-s*") for p in run.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def documented(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(experiment file, OUT_DIR) of the documented demo file, scaled, run through."""
    tmp = tmp_path_factory.mktemp("durability")
    out = tmp / "out"
    config = scaled_doc_file(out, tmp / "durability.toml")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the train.py subprocesses
        assert durability.main([str(config)]) == 0
    return config, out


@pytest.mark.slow  # ~4 min on an idle 2-core machine: 9 train.py runs of 1-2 steps of the demo model
def test_documented_durability_run_produces_its_curve(documented, capsys):
    config, out = documented
    c = durability.load(config)
    schedules = json.loads((out / "schedules.json").read_text())
    assert sorted(schedules) == sorted(f"{a}-sft-s0" for a in ARMS)
    samples_cfg, every = c.sft.get("samples", int), c.sft.get("eval_every", int)
    for name, sched in schedules.items():
        # evenly spaced points, the first after >= eval_every conversations, the last after >= samples; every
        # point scored in the loop (probes.jsonl, from step 0 on), nothing exported, the checkpoints (full train
        # states) left to retention
        per, steps, samples = sched["steps_per_eval"], sched["steps"], sched["samples"]
        assert steps[:-1] == list(range(per, steps[-1], per)) and len(steps) >= 2
        assert samples[0] >= every and samples[-1] >= samples_cfg and samples[-2] < samples_cfg
        assert samples == sorted(samples)
        run = out / "runs" / name
        assert [r["step"] for r in probes_in_loop.read(run)] == [0, *steps]
        assert not (run / "exports").exists() and not (run / "hf").exists()
        kept = {int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()}
        assert max(kept) == steps[-1] and len(kept) <= 3  # CheckpointConfig.keep_latest (default)
    assert not (out / "eval").exists()  # no point needed an evaluation of its own
    # The stages before the SFT log in-loop probes every [midtrain] probe_every steps, and at their end.
    probe_every = c.midtrain.get("probe_every", int)
    for name, table in (("document-midtrain-s0", c.midtrain), ("instruction-qa-s0", c.instruction)):
        steps = table.get("train_steps", int)
        assert [r["step"] for r in probes_in_loop.read(out / "runs" / name)] == sorted(
            {*range(0, steps + 1, probe_every), steps})
    # The preservation arm's SFT mixes in the documents: its config binds them at the configured share.
    gin = (out / "runs" / "preservation-sft-s0" / "config.gin").read_text()
    assert f"'synthetic': {c.sft.get('preservation_share', float)}" in gin and "welfare" in gin

    rows = json.loads((out / "report" / "durability.json").read_text())
    sets = c.eval.set_names  # the documented value sets: animal_welfare and its lexical variant
    welfare = sets[0]
    npoints = {a: len(schedules[f"{a}-sft-s0"]["steps"]) + 1 for a in ARMS}
    assert [(r["arm"], r["point"], r["set"]) for r in rows] == [(a, j, n) for a in ARMS for j in range(npoints[a])
                                                                for n in sets]
    assert all(r["status"] == "evaluated" for r in rows)
    by = {(r["arm"], r["point"]): r for r in rows if r["set"] == welfare}
    last = npoints["document"] - 1
    # Point 0 of the base arm is the demo's share-0 midtraining run (the model trains from scratch), scored
    # independently here, on one device as the SFT run scored it in the loop.
    read = c.eval.read_sets()
    base_margins = probes.score_model(out / "runs" / "base-midtrain-s0", [read[welfare], read["control"]])
    assert by[("base", 0)]["margin"] == base_margins[0].mean()
    assert by[("base", 0)]["samples"] == 0
    assert by[("document", last)]["samples"] == schedules["document-sft-s0"]["samples"][-1]
    # The document arm after SFT against the base arm after the same SFT, minus the neutral shift, Bonferroni over
    # every (arm, point) compared with the base arm x every set.
    family = sum(min(npoints[a], npoints["base"]) for a in ARMS if a != "base") * len(sets)
    assert schedules["document-sft-s0"]["steps"] == schedules["base-sft-s0"]["steps"]  # same SFT data and seed
    step = schedules["document-sft-s0"]["steps"][-1]
    logged = lambda arm: {r["step"]: r for r in probes_in_loop.read(out / "runs" / f"{arm}-sft-s0")}  # noqa: E731
    t, b = logged("document")[step]["margins"], logged("base")[step]["margins"]
    control = pathlib.Path(c.eval.control_pairs).stem
    expected = stats.shift_minus_control(np.array([t[welfare]]), np.array([b[welfare]]), np.array([t[control]]),
                                         np.array([b[control]]), paired_runs=True, n_boot=c.eval.bootstrap,
                                         adjusted_level=stats.bonferroni_level(family))
    row = by[("document", last)]
    assert row["vs_base"] == pytest.approx(expected["difference"], abs=1e-9)
    assert [row["adjusted_lo"], row["adjusted_hi"]] == pytest.approx(expected["difference_ci_adjusted"], abs=1e-9)
    assert f"{family} comparisons are reported together" in (out / "report" / "report.md").read_text()
    stages = (out / "report" / "report.md").read_text().split("## Stages")[1]  # estimate / actual time (goodput.json)
    assert all(re.search(rf"\| {name} \| done \| \S+ / \S+ \(\d+%\) \|", stages) for name in schedules), stages

    # The curve: probe shift vs SFT samples with CIs, one series per arm, exactly the table's numbers.
    figures = json.loads((out / "report" / "plots.json").read_text())
    curve = figures["curve.png"]
    shift = curve[f"shift - neutral shift vs base arm: {welfare}"]
    assert sorted(shift) == sorted(a for a in ARMS if a != "base")  # the base arm is the panel's zero line
    assert shift["document"][last] == pytest.approx([row["samples"], row["vs_base"], row["lo"], row["hi"]])
    margin = curve[f"margin: {welfare} (nats/token)"]["instruction"]
    assert [p[1] for p in margin] == pytest.approx([by[("instruction", j)]["margin"]
                                                    for j in range(npoints["instruction"])])
    assert (out / "report" / "curve.png").stat().st_size > 5000
    # Each arm's margin over its training steps: midtraining (the instruction arm: the base arm's midtraining, then
    # its QA tuning), then the general SFT on one axis; the document arm's last point is its last SFT record.
    training = figures["training.png"][f"in-loop margin: {welfare} (nats/token)"]
    mid_steps = c.midtrain.get("train_steps", int)
    assert training["document"][-1][:2] == pytest.approx([mid_steps + step, np.mean(t[welfare])])
    assert training["instruction"][-1][0] == mid_steps + c.instruction.get("train_steps", int) + \
        schedules["instruction-sft-s0"]["steps"][-1]
    assert len({p[0] for p in training["document"]}) == len(training["document"])  # one point per step
    assert (out / "report" / "training.png").stat().st_size > 5000

    # A rerun trains nothing and evaluates nothing new: 3 midtraining runs, the QA run, 5 SFT runs.
    capsys.readouterr()
    assert durability.main([str(config)]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 9


@pytest.mark.slow  # ~3 min on a loaded 2-core machine: the 5 SFT runs again, exporting, and 15 evaluations
def test_in_loop_points_give_the_curve_of_export_points_without_their_disk(documented, tmp_path, monkeypatch,
                                                                           capsys):
    """`[sft] points = "exports"` (what ANIMA needs): the same arms, seeds and SFT runs, each point an HF export
    scored by eval.probes. On one device, as here, the curve is the in-loop one exactly (float32 exports, the SFT
    runs' float32 compute); the in-loop SFT runs write no export."""
    config, out = documented
    exports = tmp_path / "out"
    for run in (out / "runs").iterdir():  # the same stages before the SFT: finished, so skipped
        if "-sft-s" not in run.name:
            shutil.copytree(run, exports / "runs" / run.name)
    shutil.copytree(out / "corpora", exports / "corpora")
    text = config.read_text().replace(repr(str(out)), repr(str(exports)))
    assert 'points = "in_loop"' in text
    (tmp_path / "exports.toml").write_text(text.replace('points = "in_loop"', 'points = "exports"'))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the train.py subprocesses
    assert durability.main([str(tmp_path / "exports.toml")]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 4
    in_loop = json.loads((out / "report" / "durability.json").read_text())
    exported = json.loads((exports / "report" / "durability.json").read_text())
    assert in_loop == exported
    assert all((run / "exports").is_dir() for run in (exports / "runs").glob("*-sft-s0"))
    print(f"general SFT runs on disk: in-loop points {sft_disk(out):,} bytes, export points {sft_disk(exports):,} "
          "bytes")
    assert sft_disk(exports) > sft_disk(out)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "sweeps").glob("durability_*.toml")))
def test_every_shipped_durability_file_loads_and_plans_its_stages(path, monkeypatch):
    """The files docs/eval.md points to but CI cannot run (hours of SmolLM2) are still checked as far as a plan."""
    monkeypatch.chdir(REPO)
    c = durability.load(path)
    for seed in c.seeds:
        stages = durability.pre_sft_stages(c, seed)
        assert set(stages) == set(c.arms) and stages["instruction"] is not None
        assert all(s is None or s.name.endswith(f"-s{seed}") for s in stages.values())


def test_points_of_a_stage_that_did_not_finish_are_not_scored(tmp_path, monkeypatch):
    """An export of a stage that stopped (a non-finite loss, a crash) may hold parameters no finite loss came from:
    only finished stages' points are scored; the base model's folder, outside the runs, is scored as it is."""
    c = durability.load(scaled_doc_file(tmp_path / "out", tmp_path / "durability.toml"))
    base = tmp_path / "base_model"
    folders = {name: c.run_dir(name) / "exports" / "4" for name in ("document-sft-s0", "control-sft-s0")}
    for folder in [base, *folders.values()]:
        folder.mkdir(parents=True)
    scored = []
    monkeypatch.setattr(durability_run, "evaluate", lambda folder, s, cache: scored.append(folder) or {"margins": {}})
    points = {arm: {0: [(0, base, f"{arm}-before-s0"), (8, folders[f"{arm}-sft-s0"], f"{arm}-sft-s0-4")]}
              for arm in ("document", "control")}
    status = {"document-sft-s0": {"status": "done"}, "control-sft-s0": {"status": "failed"}}
    results = durability_run.evaluate_points(c, points, c.eval, status)
    assert scored == [base, folders["document-sft-s0"], base]
    assert [n for n, _ in results["document"][0]] == [0, 8] and [n for n, _ in results["control"][0]] == [0]

    # In-loop points: each run's probes.jsonl record of the point's step, read once its stage finished.
    stems = [*c.eval.set_names, c.eval.control_pairs.stem]
    for name, value in (("document-sft-s0", 0.5), ("control-sft-s0", -0.5)):
        record = {"step": 4, "margins": {stem: [value, value] for stem in stems}}
        c.run_dir(name).mkdir(parents=True, exist_ok=True)
        (c.run_dir(name) / probes_in_loop.FILE).write_text(json.dumps(record) + "\n")
    points = {arm: {0: [(8, durability_run.InLoopPoint(c.run_dir(f"{arm}-sft-s0"), 4), "unused")]}
              for arm in ("document", "control")}
    results = durability_run.evaluate_points(c, points, c.eval, status)
    assert results == {"document": {0: [(8, {name: [0.5, 0.5] for name in [*c.eval.set_names, "control"]})]}}
    points["document"][0][0] = (8, durability_run.InLoopPoint(c.run_dir("document-sft-s0"), 6), "unused")
    with pytest.raises(ValueError, match="step 6: no in-loop probe record"):
        durability_run.evaluate_points(c, points, c.eval, status)


def test_points_setting_and_anima_need_exports(tmp_path):
    """`[sft] points` is "in_loop" or "exports"; ANIMA grades HF exports, so it asks for export points."""
    text = scaled_doc_file(tmp_path / "out", tmp_path / "d.toml").read_text()
    for points, extra, message in (('"every_step"', "", "`points` must be one of"),
                                   ('"in_loop"', 'anima_grader = "openai/gpt-4o-mini"\n', "anima_grader scores HF")):
        config = tmp_path / "bad.toml"
        config.write_text(text.replace('points = "in_loop"', f"points = {points}").replace("[eval]\n",
                                                                                          "[eval]\n" + extra))
        with pytest.raises(durability.SettingsError, match=message):
            durability.load(config)


def test_dry_run_plans_every_stage_and_writes_nothing(tmp_path, capsys):
    """--dry_run: every stage of every arm with its steps, tokens, synthetic tokens, epochs and SFT points (from the
    data pipeline the stage will build, with stand-ins for exports not made yet), estimated from the step time a
    partial stage of the same shape logged; no run, schedule, evaluation or report is written."""
    out = tmp_path / "out"
    config = scaled_doc_file(out, tmp_path / "durability.toml")
    partial = out / "runs" / "base-midtrain-s0"
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "step_time_s": t}) + "\n"
                                                   for s, t in ((1, 0.25), (2, 2.0), (3, 1.5))))
    before = {p for p in out.rglob("*") if "corpora" not in p.parts}
    assert durability.main([str(config), "--dry_run", "--no_measure"]) == 0
    text = capsys.readouterr().out
    assert {p for p in out.rglob("*") if "corpora" not in p.parts} == before
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:] if line.split()[0].endswith("-s0")}
    assert list(rows) == ["base-midtrain-s0", "document-midtrain-s0", "control-midtrain-s0", "instruction-qa-s0",
                          *[f"{a}-sft-s0" for a in ARMS]]
    # columns: arm seed steps tokens synthetic_tokens est_time epochs...; 2 steps x 8 rows x 128 tokens, 25% documents
    assert rows["document-midtrain-s0"][:6] == ["document", "0", "2", "2048", "512", "3s"]  # 2 x the median 1.5 s
    assert rows["base-midtrain-s0"][:6] == ["base", "0", "2", "2048", "0", "3s"]
    c = durability.load(config)
    midtrain = durability.pre_sft_stages(c, 0)["document"]
    init = durability_plan.stand_in(durability.start_model(c, midtrain), durability_plan.load_stage(midtrain),
                                    tmp_path / "stand_in")
    sched = durability.sample_schedule(c, functools.partial(durability.sft_stage, c, "document", 0, init))
    sft = rows["document-sft-s0"]
    assert sft[2] == str(sched.steps[-1]) and f"points {[0, *sched.samples]}" in " ".join(sft)
    assert int(rows["preservation-sft-s0"][4]) == round(0.1 * int(rows["preservation-sft-s0"][3]))
    assert "1.5 s/step, metrics: median of 3 logged windows of 1 run(s)" in text
    assert "warning: instruction-qa-s0: the run's 2 steps are shorter than its learning-rate warm-up" in text


def test_a_stage_whose_share_gets_no_row_fails_before_training(tmp_path, capsys):
    """1% documents in the preservation arm's SFT (1000-row blocks) get no row in its few steps: the pipeline stops
    with one line naming the stage before any stage trains."""
    out = tmp_path / "out"
    config = scaled_doc_file(out, tmp_path / "durability.toml")
    text = config.read_text()
    assert "preservation_share = 0.1\n" in text and '"MixtureConfig.block_size = 10"]' in text
    text = text.replace("preservation_share = 0.1", "preservation_share = 0.01")
    config.write_text(text.replace('"MixtureConfig.block_size = 10"]', '"MixtureConfig.block_size = 1000"]'))
    assert durability.main([str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage preservation-sft-s0: MixtureConfig: the token share of 'synthetic' 0.01" in err[0]
    assert not (out / "runs").exists()
