"""experiments.estimate through sweep.py --dry_run: a run's estimated wall time is its steps x the step time of its
config shape, measured here once per distinct shape (counted), or taken from the step times that runs of that shape
in the sweep's folder logged."""
import json
import pathlib

import pytest

import sweep
from experiments import estimate, plan
from tests.test_sweep import DOC, _plan_rows

# Two model configs (sequence lengths 32 and 64) x (share 0.25 at 2 seeds + the share-0 twins) = 8 runs, 2 shapes.
SWEEP = '''out_dir = "{out}"
gin_file = ["runs/demo.gin"]
gin = ["BATCH_SIZE = 8", "TrainConfig.eval_every = 1000"]
seeds = [0, 1]
shares = [0.0, 0.25]
doc_counts = [4]
budget = "fixed_total_tokens"
train_steps = 3
[models.short]
gin = ["SEQ_LEN = 32"]
[models.long]
gin = ["SEQ_LEN = 64"]
[corpora]
wel = "{corpus}"
[eval]
pairs = ["eval/probe_sets/animal_welfare.jsonl"]
'''


@pytest.fixture
def sweep_file(tmp_path) -> pathlib.Path:
    return write_sweep(tmp_path, SWEEP)


def write_sweep(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    """`text` (SWEEP or a variant) as tmp_path/s.toml, with its corpus of 6 documents."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": DOC}) + "\n" for _ in range(6)))
    path = tmp_path / "s.toml"
    path.write_text(text.format(out=tmp_path / "out", corpus=corpus))
    return path


def test_estimate_is_steps_times_the_measured_step_time_once_per_shape(sweep_file, monkeypatch, capsys):
    measured: list[tuple[str, estimate.StepTime]] = []
    real = estimate.measure

    def counting(run):
        measured.append((estimate.shape_key(run), real(run)))  # the real timing, recorded
        return measured[-1][1]

    monkeypatch.setattr(estimate, "measure", counting)
    assert sweep.main([str(sweep_file), "--dry_run", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 8 and len(measured) == 2  # one timing per distinct config shape
    seconds = dict(measured)
    assert len(seconds) == 2 and all(t.source == "measured" and t.seconds > 0 for t in seconds.values())
    for r in runs:
        assert r["estimated_seconds"] == pytest.approx(r["train_steps"] * seconds[r["step_time_shape"]].seconds)
    s = plan.load(sweep_file)
    shapes = {r.model: estimate.shape_key(s.configs[r.model]) for r in s.runs}
    assert {r["step_time_shape"] for r in runs if r["model"] == "short"} == {shapes["short"]} != {shapes["long"]}


def test_step_times_logged_by_runs_of_the_same_shape_come_first(sweep_file, monkeypatch, capsys):
    """A partial run of the 'short' shape logged step times: every 'short' run is estimated from their median, and
    only the 'long' shape is timed here."""
    s = plan.load(sweep_file)
    partial = s.run_dir(next(r for r in s.runs if r.model == "short" and r.share > 0))
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "loss": 5.0, "step_time_s": t}) + "\n"
                                                   for k, t in ((1, 0.5), (2, 0.7), (3, 0.6))))
    calls = []
    monkeypatch.setattr(estimate, "measure", lambda run: calls.append(run) or estimate.StepTime(40.0, "measured", "x"))
    assert sweep.main([str(sweep_file), "--dry_run"]) == 0
    out = capsys.readouterr().out
    rows = _plan_rows(out)
    assert len(calls) == 1 and calls[0].train.seq_len == 64
    for r in s.runs:  # columns: ... epochs_per_doc est_time baseline
        assert rows[r.name][8] == estimate.duration(3 * (0.6 if r.model == "short" else 40.0))
    assert "0.6 s/step, metrics: median of 3 logged windows of 1 run(s)" in out
    assert f"total {estimate.duration(4 * 3 * 0.6 + 4 * 3 * 40.0)} for 8 runs" in out
    assert sweep.main([str(sweep_file), "--dry_run", "--no_measure"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 1 and "4 runs without an estimate" in out
