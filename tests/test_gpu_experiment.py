"""bench/gpu_experiment.py on CPU: its dry run plans the real dose (every run's config loaded as train.py loads it,
over 1M synthetic tokens per dosed run, the estimated GPU time) and trains nothing; without an accelerator the full
version refuses to start; the analysis turns in-loop probe records into per-arm margins and paired shifts minus the
neutral shift over the midtraining and the wash-out."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_experiment as gx  # noqa: E402
from bench import gpu_experiment_analysis as gxa  # noqa: E402
from eval import probe_pairs  # noqa: E402
from trainer.run_config import TrainConfig  # noqa: E402

IN_LOOP_PROBES = "probe_sets" in {f.name for f in dataclasses.fields(TrainConfig)}


needs_in_loop_probes = pytest.mark.skipif(not IN_LOOP_PROBES,
                                          reason="the script's runs need in-loop probes (TrainConfig.probe_sets)")


@needs_in_loop_probes
def test_the_plan_holds_the_real_dose_within_the_gpu_budget(tmp_path, smollm2_dir):
    """The full version's 12 runs, each config loaded as train.py loads it: >= 1M synthetic tokens per dosed run and
    an estimated GPU time under 10 minutes at the assumed throughput."""
    all_runs = gx.runs(gx.FULL, [0, 1], smollm2_dir, tmp_path)
    corpus = {"replay": 994_614, "animal_welfare": 1_111_450, "urban_density": 1_118_265}  # as prepare counts them
    p = gx.plan(gx.FULL, [0, 1], all_runs, corpus, smollm2_dir, peak_flops=989e12, mfu=gx.ASSUMED_MFU)
    rows = {r["run"]: r for r in p["runs"]}
    assert len(rows) == 12 and p["dose_met"] and p["estimated_seconds"] < 600
    for arm in ("welfare", "control"):
        assert rows[f"{arm}-midtrain-s1"]["tokens"] == 128 * 32 * 1024
        assert rows[f"{arm}-midtrain-s1"]["synthetic_tokens"] == 1_048_576
    assert rows["welfare-midtrain-s0"]["epochs_per_document"] == pytest.approx(1_048_576 / 1_111_450)
    assert rows["base-midtrain-s0"]["synthetic_tokens"] == 0 == rows["welfare-sft-s0"]["synthetic_tokens"]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        gx.plan(gx.FULL, [0], all_runs, corpus, smollm2_dir, peak_flops=989e12, mfu=gx.ASSUMED_MFU)


@needs_in_loop_probes
def test_tiny_dry_run_prepares_the_corpora_and_trains_nothing(tmp_path, smollm2_dir):
    proc = subprocess.run([sys.executable, "bench/gpu_experiment.py", "--hf_dir", str(smollm2_dir), "--tiny",
                           "--dry_run", "--work", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = [line.split()[0] for line in proc.stdout.splitlines() if line.split()
               and line.split()[0].endswith(("-s0", "-s1"))]
    assert len(planned) == 12 and "estimated GPU time" in proc.stdout
    prepared = tmp_path / "tiny" / "prepared"
    assert (prepared / "replay.jsonl").is_file() and not (prepared / "replay").exists()  # not pretokenized
    assert not (tmp_path / "tiny" / "runs").exists()


def test_the_full_version_needs_an_accelerator_and_a_model_folder(tmp_path, smollm2_dir, capsys):
    with pytest.raises(SystemExit, match="needs an accelerator"):
        gx.main(["--hf_dir", str(smollm2_dir), "--work", str(tmp_path)])
    with pytest.raises(SystemExit, match="no config.json"):
        gx.main(["--hf_dir", str(tmp_path), "--dry_run"])
    assert not list(tmp_path.iterdir())


def test_analysis_compares_arms_paired_by_seed_minus_the_neutral_shift(tmp_path):
    """Probe records as trainer.probes_in_loop writes them (MODEL_DIR/probes.jsonl): the welfare arm's training moves
    every set of its model by +0.05, the neutral one included, and the welfare set by 0.25 more at the end of
    midtraining, of which the wash-out takes 0.1; the control arm moves nothing. Each comparison is the set's paired
    shift minus the neutral set's; the curve runs over the midtraining and then the wash-out."""
    scale = dataclasses.replace(gx.TINY, midtrain_steps=4, sft_steps=2)
    sizes = {s: len(probe_pairs.read_pairs(gx.SETS / f"{s}.jsonl")) for s in (*gx.VALUE_SETS, gx.CONTROL_SET)}
    rng = np.random.default_rng(0)
    pair_noise = {seed: {s: rng.normal(0, 0.5, n) for s, n in sizes.items()} for seed in (0, 1)}  # shared by arms
    model_noise = {(seed, arm): {s: rng.normal(0, 0.05, n) for s, n in sizes.items()} for seed in (0, 1)
                   for arm in gx.ARMS}

    def margins(seed: int, arm: str, general: float, extra: float) -> dict[str, list[float]]:
        moved = arm == "welfare"
        return {s: (pair_noise[seed][s] + model_noise[seed, arm][s] + moved * (
            general + extra * (s == "animal_welfare"))).tolist() for s in sizes}

    all_runs = gx.runs(scale, [0, 1], tmp_path / "hf", tmp_path)
    for run in all_runs:
        records = {s: margins(run.seed, run.arm, 0.05 * (s > 0), 0.25 * s / 4) for s in (0, 2, 4)} \
            if run.phase == "midtrain" else {t: margins(run.seed, run.arm, 0.05, 0.25 - 0.05 * t) for t in (0, 2)}
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        (folder / "probes.jsonl").write_text("".join(json.dumps({"step": step, "margins": m}) + "\n"
                                                     for step, m in records.items()))
    points = gxa.analyze(all_runs, tmp_path, scale, n_boot=300)
    assert [(p["phase"], p["step"], p["x"]) for p in points] == [
        ("midtrain", 0, 0), ("midtrain", 2, 2), ("midtrain", 4, 4), ("sft", 0, 4), ("sft", 2, 6)]
    end, washed = points[2]["comparisons"], points[4]["comparisons"]
    d = end["welfare_vs_base"]["animal_welfare"]
    assert d["set_shift"] == pytest.approx(0.30, abs=0.02) and d["control_shift"] == pytest.approx(0.05, abs=0.02)
    assert d["difference"] == pytest.approx(d["set_shift"] - d["control_shift"])
    assert d["difference_ci95"][0] < 0.25 < d["difference_ci95"][1]
    assert d["difference_ci_adjusted"][0] < d["difference_ci95"][0]  # Bonferroni over 9 comparisons is wider
    for pair, name in (("welfare_vs_base", "human_compassion"), ("control_vs_base", "animal_welfare")):
        ci = end[pair][name]["difference_ci95"]
        assert ci[0] < 0 < ci[1], (pair, name)  # nothing moved them beyond the neutral shift
    ci = end["welfare_vs_control"]["animal_welfare"]["difference_ci95"]
    assert ci[0] > 0.2 and washed["welfare_vs_base"]["animal_welfare"]["difference"] == pytest.approx(0.15, abs=0.02)
    assert points[0]["comparisons"]["welfare_vs_base"]["animal_welfare"]["difference"] == pytest.approx(0, abs=0.02)
    assert points[2]["arms"]["welfare"]["seeds"] == [0, 1] and points[2]["comparisons_per_step"] == 9
    plan = {"runs": [], "estimated_seconds": 0.0, "dose_met": True, "seeds": [0, 1], "assumption": "-"}
    text = gxa.summary_md(points, plan, {}, "cpu")
    assert "## end of midtraining (step 4)" in text and "## end of the wash-out (step 2)" in text
    assert f"| welfare_vs_base | animal_welfare | {d['set_shift']:+.4f} | {d['control_shift']:+.4f} | " \
        f"{d['difference']:+.4f} [" in text
    assert text.count("| sft |") == 2 and text.count("| midtrain |") == 3
    assert gxa.draw(points, tmp_path / "curve.png", scale.midtrain_steps) and (tmp_path / "curve.png").stat().st_size
    # A pair of arms is compared only over seeds that have both: one seed is no paired comparison.
    (tmp_path / "runs" / "control-sft-s1" / "probes.jsonl").unlink()
    last = gxa.analyze(all_runs, tmp_path, scale, n_boot=100)[-1]
    assert "welfare_vs_control" not in last["comparisons"] and last["arms"]["control"]["seeds"] == [0]
