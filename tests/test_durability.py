"""experiments.durability on a tiny model: every arm trained and fine-tuned, every point evaluated, and a report whose
curve holds the points' probe results (checked against an independent scoring of the base model and eval.stats)."""
import json
import pathlib

import numpy as np
import pytest

from eval import probes, stats
from experiments import durability
from tests.test_train_sft import hf_dir  # noqa: F401  (fixture: a random tiny Llama with the demo tokenizer)

REPO = pathlib.Path(__file__).resolve().parents[1]
ARMS = ["base", "document", "control", "instruction", "preservation"]


def _config(tmp_path: pathlib.Path, base: pathlib.Path) -> pathlib.Path:
    for name, src in (("welfare", "animal_welfare.jsonl"), ("neutral", "neutral_control.jsonl")):
        lines = (REPO / "eval/probe_sets" / src).read_text().splitlines(keepends=True)[:8]
        (tmp_path / f"{name}.jsonl").write_text("".join(lines))
    common = ('["BATCH_SIZE = 2", "SEQ_LEN = 64", "CheckpointConfig.export_dtype = \'float32\'", '
              '"TrainConfig.peak_flops = 1e12", "TrainConfig.log_every = 1"')
    path = tmp_path / "durability.toml"
    path.write_text(f'''out_dir = "{tmp_path / 'out'}"
seeds = [0]
[midtrain]
gin_file = ["runs/midtrain.gin", "models/tiny.gin"]
gin = {common}, "REPLAY_FILES = (@replay/demo_asset(),)", "replay/demo_asset.kind = 'replay'"]
train_steps = 2
share = 0.5
corpus_macro = "SYNTHETIC_FILES"
document_corpus = "demo:welfare"
control_corpus = "demo:control"
base_model = "{base}"
[instruction]
gin_file = ["runs/sft.gin", "models/tiny.gin"]
gin = {common}]
data = {{qa = "animal_welfare", count = 20, format = "chat"}}
train_steps = 2
[sft]
gin_file = ["runs/sft.gin", "models/tiny.gin"]
gin = {common}]
data = "demo:instructions"
samples = 4
eval_every = 2
preservation_share = 0.5
[eval]
pairs = ["{tmp_path / 'welfare.jsonl'}"]
control_pairs = "{tmp_path / 'neutral.jsonl'}"
bootstrap = 200
''')
    return path


@pytest.mark.slow  # ~3 min on an idle 2-core machine: 8 train.py runs of 1-2 steps of a tiny model, 15 evaluations
def test_tiny_durability_run_produces_its_curve(hf_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # the train.py subprocesses
    config = _config(tmp_path, hf_dir)
    assert durability.main([str(config)]) == 0
    out = tmp_path / "out"
    schedules = json.loads((out / "schedules.json").read_text())
    assert sorted(schedules) == sorted(f"{a}-sft-s0" for a in ARMS)
    for name, sched in schedules.items():
        # evenly spaced points, the first after >= eval_every (2) conversations, the last after >= samples (4);
        # every point's checkpoint kept
        per, steps, samples = sched["steps_per_eval"], sched["steps"], sched["samples"]
        assert steps[:-1] == list(range(per, steps[-1], per)) and len(steps) >= 2
        assert samples[0] >= 2 and samples[-1] >= 4 and samples[-2] < 4 and samples == sorted(samples)
        kept = {int(p.name) for p in (out / "runs" / name / "checkpoints").iterdir() if p.name.isdigit()}
        assert set(steps) <= kept
    # The preservation arm's SFT mixes in the documents: its config binds them at the configured share.
    gin = (out / "runs" / "preservation-sft-s0" / "config.gin").read_text()
    assert "'synthetic': 0.5" in gin and "welfare" in gin

    rows = json.loads((out / "report" / "durability.json").read_text())
    npoints = {a: len(schedules[f"{a}-sft-s0"]["steps"]) + 1 for a in ARMS}
    assert [(r["arm"], r["point"]) for r in rows] == [(a, j) for a in ARMS for j in range(npoints[a])]
    assert all(r["status"] == "evaluated" for r in rows)
    by = {(r["arm"], r["point"]): r for r in rows}
    last = npoints["document"] - 1
    # Point 0 of the base arm is the untouched base model: scored independently here.
    pairs, neutral = probes.read_pairs(tmp_path / "welfare.jsonl"), probes.read_pairs(tmp_path / "neutral.jsonl")
    base_margins = probes.score_model(hf_dir, [pairs, neutral])
    assert by[("base", 0)]["margin"] == pytest.approx(base_margins[0].mean(), abs=1e-6)
    assert by[("base", 0)]["samples"] == 0
    assert by[("document", last)]["samples"] == schedules["document-sft-s0"]["samples"][-1]
    # The document arm after SFT against the base arm after the same SFT, minus the neutral shift, Bonferroni over
    # every (arm, point) compared with the base arm x 1 set.
    family = sum(min(npoints[a], npoints["base"]) for a in ARMS if a != "base")
    cached = lambda stage: json.loads((out / "eval" / f"{stage}.json").read_text())["margins"]  # noqa: E731
    assert schedules["document-sft-s0"]["steps"] == schedules["base-sft-s0"]["steps"]  # same SFT data and seed
    step = schedules["document-sft-s0"]["steps"][-1]
    t, b = cached(f"document-sft-s0-{step}"), cached(f"base-sft-s0-{step}")
    expected = stats.shift_minus_control(np.array([t["welfare"]]), np.array([b["welfare"]]), np.array([t["control"]]),
                                         np.array([b["control"]]), paired_runs=True, n_boot=200,
                                         adjusted_level=stats.bonferroni_level(family))
    row = by[("document", last)]
    assert row["vs_base"] == pytest.approx(expected["difference"], abs=1e-9)
    assert [row["adjusted_lo"], row["adjusted_hi"]] == pytest.approx(expected["difference_ci_adjusted"], abs=1e-9)
    assert f"{family} comparisons are reported together" in (out / "report" / "report.md").read_text()

    # The curve: probe shift vs SFT samples with CIs, one series per arm, exactly the table's numbers.
    curve = json.loads((out / "report" / "plots.json").read_text())["curve.png"]
    shift = curve["shift - neutral shift vs base arm: welfare"]
    assert sorted(shift) == sorted(ARMS)
    assert shift["document"][last] == pytest.approx([row["samples"], row["vs_base"], row["lo"], row["hi"]])
    margin = curve["margin: welfare (nats/token)"]["instruction"]
    assert [p[1] for p in margin] == pytest.approx([by[("instruction", j)]["margin"]
                                                    for j in range(npoints["instruction"])])
    assert (out / "report" / "curve.png").stat().st_size > 5000

    # A rerun trains nothing and evaluates nothing new.
    capsys.readouterr()
    assert durability.main([str(config)]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 8
