"""Mixture schedules: MIXTURE_WEIGHTS as a list of (start step, weights) stages, checked before anything is read;
each stage's rows hold its shares, a stage start off the block grid included; data.preview shows the shares per
stage; the sweep dry run varies when the synthetic documents start (a fraction of the run, the learning rate's decay
phase) with tokens and synthetic tokens per stage; the durability pipeline's preservation arm is a schedule."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import sweep
from data.config import Component, MixtureConfig
from data.pipeline import build
from experiments import durability, plan
from tests.test_data_util import word_tokenizer, words_doc, write_gin, write_jsonl
from tests.test_durability import scaled_doc_file
from tests.test_sweep import _plan_rows, _warnings, _write, corpus  # noqa: F401 (a fixture)
from trainer import config as trainer_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEDULE = "[(0, {'replay': 1.0, 'synthetic': 0.0}), (5, {'replay': 0.75, 'synthetic': 0.25})]"


def _load(*bindings: str):
    return trainer_config.load(["runs/demo.gin"], ["MODEL_DIR = 'unused'", *bindings])


def test_a_schedule_binding_is_the_mixture_stages_and_bad_ones_name_the_macro():
    run = _load("TRAIN_STEPS = 20", f"MIXTURE_WEIGHTS = {SCHEDULE}")
    assert run.mixture.weights == {"replay": 1.0, "synthetic": 0.0}
    assert run.mixture.stages == ((5, {"replay": 0.75, "synthetic": 0.25}),)
    for schedule, words in [("[(2, {'replay': 1.0, 'synthetic': 0.0})]", "first stage is (0, weights)"),
                            ("[(0, {'replay': 1.0, 'synthetic': 0.0}), (0, {'replay': 1.0, 'synthetic': 0.0})]",
                             "weights[1]: start_step must be an int > 0"),
                            ("[(0, {'replay': 1.0, 'synthetic': 0.0}), (5, {'replay': 0.5, 'synthtic': 0.5})]",
                             "weights[1]: unknown component(s) ['synthtic']")]:
        with pytest.raises(trainer_config.ConfigError, match="MIXTURE_WEIGHTS") as err:
            _load(f"MIXTURE_WEIGHTS = {schedule}")
        assert words in str(err.value)
    with pytest.raises(trainer_config.ConfigError, match="in one place"):
        _load(f"MIXTURE_WEIGHTS = {SCHEDULE}", "MixtureConfig.stages = ((9, {'replay': 1.0, 'synthetic': 0.0}),)")
    late = _load("TRAIN_STEPS = 5", f"MIXTURE_WEIGHTS = {SCHEDULE}")  # config-valid; the run's check refuses it
    with pytest.raises(ValueError, match=r"starting at step\(s\) \[5\] never apply in a run of TRAIN_STEPS=5"):
        late.mixture.check_run()


def test_each_stage_holds_its_shares_off_the_block_grid(tmp_path):
    """Stages at steps 3 and 7 of a 10-step run of 2 data shards x 3 rows, 4-row blocks: every stage start cuts a
    block, yet each stage's rows (per shard: 9, 12 and 9) hold its shares as the blocks lay them out, and the rows
    read match MixtureConfig.stage_rows."""
    tok = word_tokenizer(tmp_path / "tok")
    a = write_jsonl(tmp_path / "a.jsonl", [words_doc(13, i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [words_doc(29, 100 + i) for i in range(40)])
    config = MixtureConfig(components=(Component("a", paths=(str(a),)), Component("b", paths=(str(b),))),
                           weights=[(0, {"a": 1.0, "b": 0.0}), (3, {"a": 0.5, "b": 0.5}), (7, {"a": 0.25, "b": 0.75})],
                           tokenizer=str(tok), seq_len=16, batch_size=6, block_size=4, num_shards=2, train_steps=10)
    pipe = build(config)
    comps = np.stack([next(pipe.iterator)["component"] for _ in range(10)])  # [step, 6 rows]: shard 0 then 1
    pipe.iterator.close()
    for shard in (0, 1):
        rows = comps[:, 3 * shard:3 * shard + 3]
        assert [int((rows[s:e] == 1).sum()) for s, e in ((0, 3), (3, 7), (7, 10))] == [0, 6, 7]
        # 12 rows at 50% in 4-row blocks: 2 each; 9 rows at 75%: two blocks of 3, then 1 of the last row
    assert [rows["b"] for _, _, rows in config.stage_rows()] == [0, 6, 7]


def test_preview_shows_each_stage(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", [words_doc(16, 50 * k + i) for i in range(30)])
             for k, n in enumerate(("replay", "synthetic"))}
    gin = write_gin(tmp_path / "run.gin", tokenizer=tok, components=files, weights={"replay": 1.0, "synthetic": 0.0},
                    model_dir=tmp_path / "run")
    cmd = [sys.executable, "-m", "trainer.preview", f"--gin_file={gin}", "--num_batches", "8", "--json",
           "--gin.TRAIN_STEPS=8", f"--gin.MIXTURE_WEIGHTS={SCHEDULE}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(s["start"], s["end"]) for s in out["stages"]] == [(0, 5), (5, 8)]
    assert [s["components"]["synthetic"]["token_share"] for s in out["stages"]] == [0.0, 0.25]  # 3 of 12 rows
    assert out["stages"][1]["weights"] == {"replay": 0.75, "synthetic": 0.25}
    table = subprocess.run(cmd[:-5] + ["--num_batches", "8", "--samples", "0"] + cmd[-2:], cwd=REPO,
                           capture_output=True, text=True, timeout=300).stdout
    assert "stage from step 5 (steps 5-7 read)" in table


def test_sweep_varies_when_the_documents_start(corpus, tmp_path, capsys):  # noqa: F811
    """synthetic_from 0.5 and "decay" (warmup_stable_decay with decay_fraction 0.2 over 25 steps: from step 20)
    cross the 25% share; their runs read replay only until then, and the plan gives each stage's tokens."""
    _write(tmp_path / "s.toml", tmp_path / "out", corpus, "fixed_total_tokens",
           'train_steps = 25\nsynthetic_from = [0.0, 0.5, "decay"]')
    text = (tmp_path / "s.toml").read_text().replace('"SEQ_LEN = 128"]', '"SEQ_LEN = 128", '
                                                     '"OptimizerConfig.schedule = \'warmup_stable_decay\'", '
                                                     '"OptimizerConfig.warmup_steps = 2"]')
    (tmp_path / "s.toml").write_text(text.replace("[5, 10]", "[10]").replace("[0.0, 0.05, 0.25]", "[0.0, 0.25]"))
    assert sweep.main([str(tmp_path / "s.toml"), "--dry_run", "--no_measure"]) == 0
    out = capsys.readouterr().out
    rows = _plan_rows("\n".join(line for line in out.splitlines() if not line.startswith("    stage")))
    # 1,024 tokens per step; 400 corpus tokens. The whole run: 25,600 tokens, 6,400 synthetic (16 epochs).
    assert rows["model-wel-n10-w0.25-t25-s0"][3:8] == ["25", "25600", "6400", "400", "16.0000"]
    assert rows["model-wel-n10-w0.25-t25-from12-s0"][3:8] == ["25", "25600", "3328", "400", "8.3200"]  # 13 steps
    assert rows["model-wel-n10-w0.25-t25-from20-s0"][3:8] == ["25", "25600", "1280", "400", "3.2000"]  # 5 steps
    assert "    stage from step 0: steps 0-19, 20480 tokens, 0 synthetic" in out
    assert "    stage from step 20: steps 20-24, 5120 tokens, 1280 synthetic" in out
    assert all(r[-1] == f"model-base-t25-{name.rsplit('-', 1)[1]}" for name, r in rows.items() if "-w0.25-" in name)
    s = plan.load(tmp_path / "s.toml")
    late = next(r for r in s.runs if r.synthetic_from == 20)
    assert "MIXTURE_WEIGHTS = [(0, {'replay': 1.0, 'synthetic': 0.0}), (20, {'replay': 0.75, 'synthetic': 0.25})]" \
        in late.bindings
    # A fixed exposure lengthens a late-start run until its window holds the epochs: 1,600 synthetic tokens at 25%
    # 6.25 steps of documents: 7 from step 6 of 13 (the fewest: 12 steps would start at 6), 7 from 58 of 65.
    (tmp_path / "s.toml").write_text((tmp_path / "s.toml").read_text().replace(
        'budget = "fixed_total_tokens"', 'budget = "fixed_synthetic_exposure"\nsynthetic_epochs = 4').replace(
        "train_steps = 25\n", "").replace('"decay"', "0.9"))
    assert sweep.main([str(tmp_path / "s.toml"), "--dry_run", "--no_measure"]) == 0
    rows = _plan_rows("\n".join(line for line in capsys.readouterr().out.splitlines()
                                if not line.startswith("    stage")))
    assert rows["model-wel-n10-w0.25-t13-from6-s0"][3:8] == ["13", "13312", "1792", "400", "4.4800"]
    assert rows["model-wel-n10-w0.25-t65-from58-s0"][3:8] == ["65", "66560", "1792", "400", "4.4800"]
    assert rows["model-wel-n10-w0.25-t7-s0"][3:8] == ["7", "7168", "1792", "400", "4.4800"]
    # "decay" needs a schedule with a decay phase of its own.
    (tmp_path / "s.toml").write_text(text.replace(", \"OptimizerConfig.schedule = 'warmup_stable_decay'\"", ""))
    assert sweep.main([str(tmp_path / "s.toml"), "--dry_run", "--no_measure"]) == 2
    assert "has no decay phase of its own" in capsys.readouterr().err


def test_preservation_arm_is_a_schedule(tmp_path, capsys):
    """[[0.0, 0.1], [0.5, 0.0]]: 10% documents in the first half of the preservation arm's SFT, none after; the plan
    counts its synthetic tokens in that half only."""
    out = tmp_path / "out"
    config = scaled_doc_file(out, tmp_path / "durability.toml")
    config.write_text(config.read_text().replace("preservation_share = 0.1", "preservation_share = [[0.0, 0.1], "
                                                 "[0.5, 0.0]]").replace("samples = 16", "samples = 40"))
    c = durability.load(config)
    assert c.preservation == ((0.0, 0.1), (0.5, 0.0)) and "preservation" in c.arms
    stage = durability.sft_stage(c, "preservation", 0, "unused", 6)
    assert "MIXTURE_WEIGHTS = [(0, {'sft': 0.9, 'synthetic': 0.1}), (3, {'sft': 1.0, 'synthetic': 0.0})]" \
        in stage.bindings
    # In a 1-step run both stages start at step 0 (0.5 x 1 rounds to 0): the later one applies.
    assert durability.preservation_weights(c, 1) == [(0, {"sft": 1.0, "synthetic": 0.0})]
    assert durability.main([str(config), "--dry_run", "--no_measure"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]
            if line.split()[0].endswith("-sft-s0")}
    steps, tokens, synthetic = (int(x) for x in rows["preservation-sft-s0"][2:5])
    assert synthetic == round(0.1 * round(0.5 * steps) * tokens // steps) > 0
    for bad in ("[[0.1, 0.1]]", "[[0.0, 0.1], [0.0, 0.2]]", "1.5"):
        config.write_text(config.read_text().replace("[[0.0, 0.1], [0.5, 0.0]]", bad))
        with pytest.raises(ValueError, match="preservation_share"):
            durability.load(config)
        config.write_text(config.read_text().replace(bad, "[[0.0, 0.1], [0.5, 0.0]]"))
