"""train.py with a two-stage mixture schedule bound through MIXTURE_WEIGHTS (tiny model, subprocesses): each stage
gets exactly its token shares, a run resumed in the middle of a stage (and of a mixture block) from a moved copy of
its corpora ends bit-identical to the uninterrupted run, and a resume on a changed corpus is refused in one line
(exit 2) unless TrainConfig.allow_data_change says the change is intended."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, RESUME_AT = 8, 4
# 4 rows of 32 tokens per step, one data shard, 8-row mixture blocks. The second stage starts at step 3 = row 12,
# inside the first stage's second block, which it cuts to 4 rows; its 20 rows are two 8-row blocks of 2 synthetic
# rows each plus a 4-row block of 1: 5 rows, exactly 25%.
SCHEDULE = "[(0, {'replay': 1.0, 'synthetic': 0.0}), (3, {'replay': 0.75, 'synthetic': 0.25})]"
ARGS = ["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32",
        f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_EVERY=2", "--gin.CheckpointConfig.keep_latest=4",
        "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=None", "--gin.TrainConfig.peak_flops=1e12",
        "--gin.TrainConfig.progress_bar=False", "--gin.MixtureConfig.block_size=8",
        "--gin.OptimizerConfig.warmup_steps=2", f"--gin.MIXTURE_WEIGHTS={SCHEDULE}"]


def train(model_dir: pathlib.Path, corpus: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *ARGS, f"--gin.MODEL_DIR={model_dir}",
           f"--gin.replay/Component.paths=('{corpus}/replay.jsonl',)",
           f"--gin.synthetic/Component.paths=('{corpus}/welfare.jsonl',)", *extra]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def records(model_dir: pathlib.Path) -> dict[int, dict]:
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def corpus_copy(folder: pathlib.Path) -> pathlib.Path:
    from trainer.demo_assets import demo_asset

    folder.mkdir(parents=True)
    for kind in ("replay", "welfare"):
        shutil.copyfile(demo_asset(kind), folder / f"{kind}.jsonl")
    return folder


def stopped_at(reference: pathlib.Path, folder: pathlib.Path, step: int) -> pathlib.Path:
    """A copy of the reference run as a crash after the checkpoint of `step` leaves it: the later checkpoints gone."""
    shutil.copytree(reference, folder)
    for later in (p for p in (folder / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) > step):
        shutil.rmtree(later)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(the uninterrupted run, its corpus folder)."""
    root = tmp_path_factory.mktemp("schedule")
    corpus = corpus_copy(root / "corpus")
    proc = train(root / "run", corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", corpus


def test_each_stage_gets_its_token_shares(reference):
    run, _ = reference
    recs = records(run)
    stage1 = {c: recs[3][f"tokens/{c}"] for c in ("replay", "synthetic")}
    stage2 = {c: recs[STEPS][f"tokens/{c}"] - stage1[c] for c in ("replay", "synthetic")}
    assert stage1 == {"replay": 3 * 4 * 32, "synthetic": 0}
    assert stage2 == {"replay": 15 * 32, "synthetic": 5 * 32}  # 25% of the stage's 20 rows
    meta = json.loads((run / "checkpoints" / str(STEPS) / "metadata" / "metadata").read_text())
    assert meta["mixture"]["stages"] == [[3, {"replay": 0.75, "synthetic": 0.25}]]
    assert [f["path"] for f in meta["data_fingerprint"]["synthetic"]["files"]] == [str(reference[1] / "welfare.jsonl")]


@pytest.mark.slow  # ~40 s on an idle 2-core machine: three train.py resumes of the tiny model
def test_mid_stage_resume_is_exact_and_a_changed_corpus_is_refused(reference, tmp_path):
    run, corpus = reference
    want = records(run)
    # Resumed at step 4 (mid-stage, mid-block) from a moved copy of the corpora: the same data, the same run.
    resumed = stopped_at(run, tmp_path / "resumed", RESUME_AT)
    proc = train(resumed, corpus_copy(tmp_path / "moved"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = records(resumed)
    assert {s: (r["loss"], r["tokens/synthetic"]) for s, r in got.items()} == \
        {s: (r["loss"], r["tokens/synthetic"]) for s, r in want.items()}  # bit-identical floats
    assert (resumed / "hf" / "model.safetensors").read_bytes() == (run / "hf" / "model.safetensors").read_bytes()

    # One document of the synthetic corpus edited (same size): refused before anything trains, checkpoints kept.
    changed = corpus_copy(tmp_path / "changed")
    text = (changed / "welfare.jsonl").read_text()
    (changed / "welfare.jsonl").write_text(text.replace("animal", "Animal", 1))
    refused = stopped_at(run, tmp_path / "refused", RESUME_AT)
    proc = train(refused, changed)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert f"{refused}/checkpoints/{RESUME_AT} was trained on other data: component 'synthetic': " in error
    assert "welfare.jsonl content changed" in error and "TrainConfig.allow_data_change=True" in error
    assert sorted(p.name for p in (refused / "checkpoints").iterdir()) == ["2", "4"]
    assert max(records(refused)) == STEPS  # nothing was written: the records past step 4 are still there

    # The same resume, said to be intended: it trains on, logging what changed.
    proc = train(refused, changed, "--gin.TrainConfig.allow_data_change=True")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr and "on changed data" in proc.stderr and "content changed" in proc.stderr
    assert max(records(refused)) == STEPS and records(refused)[RESUME_AT]["loss"] == want[RESUME_AT]["loss"]
