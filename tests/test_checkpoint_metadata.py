"""trainer.run_metadata: what a resume must match, and the error that lists every difference."""
import dataclasses
import json
import logging
import re

import pytest

from trainer import config, run_metadata


@pytest.fixture(scope="module")
def demo():
    return config.load([])


def meta(run):
    return run_metadata.build(run.model, run.mixture, step=10, tokens_seen={"replay": 5, "synthetic": 1})


def test_same_run_passes_and_round_trips_model_config(demo):
    saved = meta(demo)
    run_metadata.check(saved, meta(demo), "ckpt")
    assert run_metadata.model_config_from_dict(saved["model_config"]) == demo.model
    assert saved["layout"] == "stacked" and len(saved["tokenizer_sha256"]) == 64


def test_every_difference_is_named(demo):
    other = dataclasses.replace(demo.model, hidden_size=256, num_layers=2)
    current = meta(dataclasses.replace(demo, model=other))
    current["tokenizer_sha256"] = "0" * 64
    current["mixture"]["seq_len"] = 64
    with pytest.raises(run_metadata.CheckpointMismatch) as err:
        run_metadata.check(meta(demo), current, "runs/x/checkpoints/10")
    text = str(err.value)
    for word in ("runs/x/checkpoints/10", "hidden_size", "num_hidden_layers", "tokenizer", "seq_len", "init_from"):
        assert word in text, text


def test_new_weights_and_runtime_layout_are_allowed(demo, caplog):
    run = config.load([], ["MIXTURE_WEIGHTS = {'replay': 1.0, 'synthetic': 0.0}", "ModelConfig.scan_layers = False"])
    assert [c.name for c in run.mixture.active_components] == ["replay"]
    with caplog.at_level(logging.WARNING):
        run_metadata.check(meta(demo), meta(run), "ckpt")
    assert "new mixture weights" in caplog.text


def test_run_files_take_the_model_from_init_from(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    eight_b = config.load(["runs/demo.gin", "models/llama3_1_8b.gin"]).model
    (hf / "config.json").write_text(json.dumps(eight_b.to_hf()))
    common = ["MODEL_DIR = '/tmp/x'", f"INIT_FROM = '{hf}'"]
    mid = config.load(["runs/midtrain.gin"], common + ["REPLAY_FILES = ('a.jsonl',)", "SYNTHETIC_FILES = ('b.jsonl',)"])
    assert mid.model == eight_b.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full")
    assert mid.train.init_from == str(hf) and mid.mixture.tokenizer == str(hf)
    small = config.load([]).model  # the demo model: the same run file takes whatever INIT_FROM holds
    (hf / "config.json").write_text(json.dumps(small.to_hf()))
    sft = config.load(["runs/sft.gin", "mixtures/sft_with_synthetic.gin"],
                      common + ["SFT_FILES = ('qa.jsonl',)", "SYNTHETIC_FILES = ('b.jsonl',)"])
    # Both run files carry their memory settings, whatever INIT_FROM holds (BENCHMARKS.md: 8B fits with them).
    assert sft.model == small.replace(compute_dtype="bfloat16", remat="full")
    assert (mid.train.loss_chunk, mid.train.microbatches, sft.train.loss_chunk, sft.train.microbatches) == \
        (256, 2, 256, 1)
    assert [c.format for c in sft.mixture.components] == ["chat", "text"]
    assert sft.mixture.weights == {"sft": 0.9, "synthetic": 0.1}


@pytest.mark.parametrize("bindings, named", [
    ([], "INIT_FROM is not set"),
    (["INIT_FROM = '/no/such/folder'"], "INIT_FROM=/no/such/folder: no such directory"),
    (["model_from_init.runtime = {'remat': 'full', 'hidden_size': 8}"], "model_from_init.runtime: unknown field(s) ['hidden_size']"),
])
def test_run_file_model_errors_name_the_binding(bindings, named):
    with pytest.raises(config.ConfigError, match=re.escape(named)) as err:
        config.load(["runs/sft.gin"], ["MODEL_DIR = '/tmp/x'", "SFT_FILES = ('qa.jsonl',)", *bindings])
    assert "\n" not in str(err.value)


def with_optimizer(run, train_steps=100, **changes):
    return run_metadata.build(run.model, run.mixture, step=50, tokens_seen={},
                              optimizer=dataclasses.replace(run.optimizer, **changes), train_steps=train_steps)


def test_a_changed_schedule_is_refused_unless_a_new_phase_starts_at_the_resumed_step(demo, caplog):
    assert demo.optimizer.schedule == "warmup_cosine"
    saved = with_optimizer(demo)
    run_metadata.check_optimizer(saved, with_optimizer(demo), 50, "ckpt")
    with pytest.raises(run_metadata.CheckpointMismatch) as err:   # cosine over 200 steps: another lr from step 51
        run_metadata.check_optimizer(saved, with_optimizer(demo, train_steps=200), 50, "runs/x/checkpoints/50")
    for words in ("runs/x/checkpoints/50", "learning-rate schedule (train_steps)", "at step 51",
                  "--gin.TRAIN_STEPS=100", "--gin.OptimizerConfig.schedule_start=50"):
        assert words in str(err.value), str(err.value)
    with pytest.raises(run_metadata.CheckpointMismatch,
                       match=f"optimizer weight_decay: checkpoint {demo.optimizer.weight_decay}, config 0.5"):
        run_metadata.check_optimizer(saved, with_optimizer(demo, weight_decay=0.5), 50, "ckpt")
    with pytest.raises(run_metadata.CheckpointMismatch):          # a phase must start where the run resumes
        run_metadata.check_optimizer(saved, with_optimizer(demo, train_steps=200, schedule_start=40), 50, "ckpt")
    with caplog.at_level(logging.WARNING):
        run_metadata.check_optimizer(saved, with_optimizer(demo, train_steps=200, schedule_start=50), 50, "ckpt")
    assert "new schedule phase from step 50" in caplog.text
    constant = with_optimizer(demo, schedule="constant")          # same lr at every remaining step: accepted
    run_metadata.check_optimizer(constant, with_optimizer(demo, train_steps=200, schedule="constant"), 50, "ckpt")


def test_a_new_schedule_phase_is_the_schedule_of_the_remaining_steps():
    from trainer import optimizer
    from trainer.run_config import OptimizerConfig

    for shape in ("warmup_cosine", "warmup_stable_decay"):
        phase = optimizer.schedule(OptimizerConfig(schedule=shape, warmup_steps=10, schedule_start=50), 200)
        fresh = optimizer.schedule(OptimizerConfig(schedule=shape, warmup_steps=10), 150)
        assert [float(phase(50 + k)) for k in range(0, 150, 7)] == [float(fresh(k)) for k in range(0, 150, 7)]
    with pytest.raises(ValueError, match="schedule_start=200 must be below TRAIN_STEPS=200"):
        optimizer.schedule(OptimizerConfig(schedule_start=200), 200)
