"""train.py end to end on a tiny model (subprocesses, 2 fake CPU devices): exact resume after a real SIGKILL, the keep
policy, restore_model, the metadata check, and the Hugging Face export loaded by transformers."""
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32",
        "--gin.CHECKPOINT_EVERY=2", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=None",
        "--gin.TrainConfig.peak_flops=1e12", "--gin.CheckpointConfig.keep_latest=2",
        "--gin.CheckpointConfig.keep_every=4", "--gin.OptimizerConfig.warmup_steps=2"]
STEPS = 8


def env() -> dict:
    out = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(REPO))
    return out


def train_cmd(model_dir, *extra) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *TINY, f"--gin.MODEL_DIR={model_dir}",
            f"--gin.TRAIN_STEPS={STEPS}", *extra]


def run_train(model_dir, *extra, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(model_dir, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def losses(model_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """An uninterrupted 8-step run."""
    model_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(model_dir)
    return model_dir


def kill_mid_run(model_dir: pathlib.Path, kill_at: int) -> int | None:
    """Starts train.py and SIGKILLs it once `kill_at` steps are logged; the number of steps logged by then, or None
    when the run got to its end first (a loaded CI worker can be off the CPU for longer than the ~0.4 s the last steps
    of the tiny run take)."""
    proc = subprocess.Popen(train_cmd(model_dir), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = model_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.005)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    return None if finished or killed_at >= STEPS else killed_at


@pytest.mark.slow  # ~60 s on an idle 2-core machine: three train.py processes (reference, killed, resumed)
def test_resume_after_sigkill_is_bit_identical(reference, tmp_path):
    kill_at = random.Random().randint(2, STEPS - 4)
    for attempt in range(3):  # a fresh run when the kill came too late to interrupt it
        model_dir = tmp_path / f"run{attempt}"
        killed_at = kill_mid_run(model_dir, kill_at)
        if killed_at is not None:
            break
    assert killed_at is not None, f"3 runs all finished before the kill (asked at step {kill_at})"
    run_train(model_dir)
    got, want = losses(model_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1)), f"steps logged after resume (killed at {killed_at}): {sorted(got)}"
    assert got == want, f"killed at step {killed_at}"                     # bit-identical floats
    for name in ("model.safetensors", "config.json"):
        assert (model_dir / "hf" / name).read_bytes() == (reference / "hf" / name).read_bytes()


# train.py, killed (SIGKILL) by its metrics writer once it has written half of the record of step {step}.
KILL_MID_RECORD = """
import json, os, runpy, signal, sys
from trainer import metrics_file

append = metrics_file.MetricsFile.append

def append_cut_short(self, records):
    steps = [r["step"] for r in records]
    if {step} in steps:
        done = records[:steps.index({step})]
        line = json.dumps(records[len(done)])
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\\n" for r in done) + line[:len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    append(self, records)

metrics_file.MetricsFile.append = append_cut_short
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # 20 s at load average 2, 40 s at 4: two train.py processes (the reference run is shared)
def test_a_kill_while_a_metrics_record_is_written_does_not_block_resume(reference, tmp_path):
    """The record of step 5 is cut short by a SIGKILL (no checkpoint of step 5 yet: one every 2 steps). The resumed
    run drops it with a warning naming the file and line, and every loss equals the uninterrupted run's. Both
    processes run under umask 027: everything they write is 0640/0750."""
    from tests.test_file_modes import wrong_modes

    model_dir, step = tmp_path / "run", 5
    killed = subprocess.run([sys.executable, "-c", KILL_MID_RECORD.format(step=step), *train_cmd(model_dir)[1:]],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, umask=0o027)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    text = (model_dir / "metrics.jsonl").read_text()
    assert text.count("\n") == step - 1 and not text.endswith("\n")       # steps 1-4 and half of step 5
    resumed = subprocess.run(train_cmd(model_dir), cwd=REPO, env=env(), capture_output=True, text=True,
                             timeout=600, umask=0o027)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = f"{model_dir / 'metrics.jsonl'}:{step}: dropped a partial last record"
    assert resumed.stderr.count(warning) == 1, resumed.stderr[-3000:]
    assert losses(model_dir) == losses(reference)                          # bit-identical floats, steps 1-8
    assert wrong_modes(model_dir, 0o027) == []


def test_a_malformed_metrics_line_stops_the_resume_before_compiling(reference, tmp_path):
    """A bad line that is not the last one is an error naming the file and line (exit 2), before the data is read
    or anything compiled, and nothing in the run directory changes."""
    from tests.test_checkpoint_signals import tree_digest

    model_dir = tmp_path / "copy"
    shutil.copytree(reference, model_dir)
    lines = (model_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\n"
    (model_dir / "metrics.jsonl").write_text("".join(lines))
    digest = tree_digest(model_dir)
    proc = run_train(model_dir, check=False)  # the same command again
    assert proc.returncode == 2
    assert f"train.py: error: {model_dir / 'metrics.jsonl'}:3: invalid JSON" in proc.stderr, proc.stderr[-3000:]
    assert "compiled the train step" not in proc.stderr and "records parsed" not in proc.stderr
    assert tree_digest(model_dir) == digest


def test_run_directory_follows_the_umask(reference):
    """Everything train.py wrote, its export included, has the modes this process's umask gives."""
    import storage
    from tests.test_file_modes import wrong_modes

    assert wrong_modes(reference, storage.umask()) == []


def test_keep_policy_and_layout(reference):
    steps = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6, 8]                      # latest 2, plus every 4th forever
    step_dir = reference / "checkpoints" / "8"
    assert {p.name for p in step_dir.iterdir()} >= {"params", "opt_state", "data", "metadata"}
    meta = json.loads((step_dir / "metadata" / "metadata").read_text())
    assert meta["layout"] == "stacked" and meta["step"] == 8
    assert meta["mixture"]["components"] == ["replay", "synthetic"]
    assert sum(meta["tokens_seen"].values()) == STEPS * 4 * 32    # concat-then-split rows have no padding
    assert (reference / "config.gin").read_text().count("TRAIN_STEPS = 8") == 1
    assert (reference / "tokenizer" / "tokenizer.json").is_file()
    assert list((reference / "tb").iterdir())


def test_restore_model_and_export_match_transformers(reference):
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from trainer.checkpoint import restore_model

    tokens = np.array([[1, 57, 300, 12, 999, 4000, 5, 77]], np.int32)
    model, config, tokenizer_dir = restore_model(reference)
    step_model, _, _ = restore_model(reference / "checkpoints" / "8")
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_array_equal(ours, np.asarray(step_model(jnp.asarray(tokens))))
    assert tokenizer_dir == reference / "tokenizer" and config.vocab_size == 6000
    hf_cfg = json.loads((reference / "hf" / "config.json").read_text())
    assert hf_cfg["torch_dtype"] == "bfloat16" and (reference / "hf" / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    # The export is bf16: compare with our model run on the same bf16-rounded weights.
    from flax import nnx
    graphdef, params = nnx.split(model, nnx.Param)
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    ours_bf16 = np.asarray(nnx.merge(graphdef, rounded)(jnp.asarray(tokens)))
    np.testing.assert_allclose(theirs, ours_bf16, atol=1e-4)
    assert np.abs(theirs - ours).max() < 0.1      # and bf16 rounding moved the logits only a little


def test_resume_with_another_model_is_refused(reference, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(reference, model_dir)
    proc = run_train(model_dir, "--gin.TRAIN_STEPS=10", "--gin.ModelConfig.intermediate_size=96", check=False)
    assert proc.returncode == 2
    assert "intermediate_size" in proc.stderr and "cannot be resumed" in proc.stderr
    assert sorted(p.name for p in (model_dir / "checkpoints").iterdir()) == ["4", "6", "8"]


def test_train_steps_below_the_checkpoint_warns(reference, tmp_path):
    """TRAIN_STEPS below the checkpoint's step trains nothing: the run says so instead of a bare "done"."""
    model_dir = tmp_path / "copy"
    shutil.copytree(reference, model_dir)
    proc = run_train(model_dir, "--gin.TRAIN_STEPS=4")
    assert f"nothing was trained: {model_dir} is at step {STEPS}, beyond TRAIN_STEPS=4" in proc.stderr, proc.stderr
    # 4 steps of 4 rows hold the demo mixture's 10% only as whole rows: 2 of 16, and the run says so.
    assert "the run's 16 rows per data shard (4 steps x 4 rows) hold the shares only as whole rows: 'replay' 0.9 as " \
        "14 rows (0.875), 'synthetic' 0.1 as 2 rows (0.125)" in proc.stderr
    assert sorted(p.name for p in (model_dir / "checkpoints").iterdir()) == ["4", "6", "8"]


def test_longer_run_is_refused_until_it_starts_a_new_schedule_phase(reference, tmp_path):
    import shlex

    import train
    from trainer import loop

    model_dir = tmp_path / "copy"
    shutil.copytree(reference, model_dir)
    proc = run_train(model_dir, "--gin.TRAIN_STEPS=16", check=False)   # cosine over 16 steps: another lr from step 9
    assert proc.returncode == 2
    assert "learning-rate schedule (train_steps)" in proc.stderr and "schedule_start=8" in proc.stderr
    assert sorted(p.name for p in (model_dir / "checkpoints").iterdir()) == ["4", "6", "8"]

    # The end-of-run summary's "train longer" command works as printed.
    argv = train_cmd(model_dir)[2:]
    summary = loop.Summary(model_dir=model_dir, step=STEPS, stopped="done", loss=None, component_loss={},
                           eval_loss={}, eval_tokens={}, tokens_per_s=0.0, mfu=0.0, peak_source="", checkpoint=None, export=None)
    longer = next(line for line in train.format_summary(summary, argv).splitlines() if "# train longer" in line)
    cmd = shlex.split(longer.split("#")[0])
    assert cmd[:2] == ["python", "train.py"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *cmd[2:]], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 2 * STEPS + 1))
    # A new phase over the remaining 8 steps: warmup and cosine as the first 8 steps had (not the old cosine's tail).
    assert [r["lr"] for r in recs[STEPS:]] == pytest.approx([r["lr"] for r in recs[:STEPS]], rel=1e-6)

    # Its data preview reads this run's mixture (the tiny config's rows), and the demo's share hint is not offered.
    text = train.format_summary(summary, argv)
    preview = shlex.split(next(line for line in text.splitlines() if "# look at the training data" in line)
                          .split("#")[0])
    assert preview[:3] == ["python", "-m", "trainer.preview"] and "demo_5pct" not in text
    proc = subprocess.run([sys.executable, *preview[1:], "--json"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["rows"] == 4 * 4  # BATCH_SIZE=4 of the tiny config, 4 batches
    assert "demo_5pct" in train.format_summary(summary, ["--gin.TRAIN_STEPS=3"])  # the embedded demo
