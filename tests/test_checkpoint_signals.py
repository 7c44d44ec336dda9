"""SIGTERM saves a checkpoint and exits 0 promptly; a non-finite loss stops the run (exit 1) without writing a checkpoint,
naming the last good one (a finite loss came from it), which retention kept byte-for-byte intact and the rerun resumes
from."""
import hashlib
import json
import re
import signal
import subprocess
import time

import pytest

from tests.test_train_resume import REPO, env, train_cmd
from trainer import nonfinite
from trainer.checkpoint_health import RECORD


def tree_digest(path, skip: str | None = None) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != skip):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow  # ~70 s on an idle 2-core machine: three train.py processes
def test_sigterm_saves_then_nan_stops_without_saving(tmp_path):
    model_dir = tmp_path / "run"
    cmd = train_cmd(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_EVERY=100000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = model_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    took = time.time() - sent
    assert proc.returncode == 0, err[-3000:]
    assert took < 30, f"SIGTERM took {took:.1f}s to save and exit"
    assert "(preempted)" in out
    steps = [p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1                                     # only the preemption checkpoint (CHECKPOINT_EVERY is huge)
    saved = int(steps[0])
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert saved == logged[-1] >= 3
    good = model_dir / "checkpoints" / steps[0]
    digest = tree_digest(good)

    # Resume with an absurd learning rate (a new schedule phase from `saved`, no warmup), a checkpoint every step and
    # only the latest one kept: step saved+1's loss is computed from the good parameters (finite), its update overflows and is
    # saved as checkpoint saved+1, and step saved+2's loss is non-finite. Checkpoint saved+1 is poisoned; `saved` is
    # the last good one, and retention must not have deleted it.
    bad = saved + 1
    proc = subprocess.run(train_cmd(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_EVERY=1",
                                    "--gin.CheckpointConfig.keep_latest=1", "--gin.OptimizerConfig.learning_rate=1e30",
                                    f"--gin.OptimizerConfig.schedule_start={saved}",
                                    "--gin.OptimizerConfig.warmup_steps=0"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stopped without saving" in proc.stderr
    assert f"last good checkpoint is {model_dir}/checkpoints/{saved} " in proc.stderr, proc.stderr[-3000:]
    kept = model_dir / "metrics_set_aside" / str(bad + 1)  # this attempt's metrics, which the rerun truncates
    assert f"This attempt's metrics are kept in {kept}." in proc.stderr.strip().splitlines()[-1]
    diverged = metrics.read_text()
    assert (kept / "metrics.jsonl").read_text() == diverged and f"step {bad + 1}: non-finite " in \
        (kept / "reason.txt").read_text()
    what = "(loss|gradient norm|loss and gradient norm)"  # the message names the same one twice
    assert re.search(rf"step {bad + 1}: non-finite {what}\b.* Checkpoints \[{bad}\] hold the parameters that gave "
                     r"this \1 \(or came after them\)", proc.stderr), proc.stderr[-3000:]
    assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == [saved, bad]
    assert tree_digest(good, skip=RECORD) == digest
    verdict = lambda step: json.loads((model_dir / "checkpoints" / str(step) / RECORD).read_text())["verdict"]  # noqa
    assert (verdict(saved), verdict(bad)) == ("good", "nonfinite")

    # The rerun (a sane learning rate) resumes from the good checkpoint, not the newer poisoned one, and keeps that.
    first_try = json.loads(metrics.read_text().splitlines()[-1])
    assert first_try["step"] == saved + 1
    proc = subprocess.run(train_cmd(model_dir, f"--gin.TRAIN_STEPS={saved + 2}", "--gin.CHECKPOINT_EVERY=100000",
                                    f"--gin.OptimizerConfig.schedule_start={saved}"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, saved + 3))   # records after the resumed step are replaced
    assert (kept / "metrics.jsonl").read_text() == diverged
    assert records[saved]["loss"] == first_try["loss"]   # step saved+1 again, from the same parameters and data
    set_aside = model_dir / "checkpoints_set_aside" / str(bad)
    assert "non-finite" in (set_aside / "reason.txt").read_text() and (set_aside / "params").is_dir()


@pytest.mark.parametrize("loss, grad_norm, what", [
    (float("nan"), 1.5, "non-finite loss: loss=nan grad_norm=1.5"),
    (2.25, float("inf"), "non-finite gradient norm (the loss is finite): loss=2.25 grad_norm=inf"),
    (float("nan"), float("nan"), "non-finite loss and gradient norm: loss=nan grad_norm=nan"),
])
def test_the_nan_message_says_which_was_not_finite(loss, grad_norm, what):
    class Checkpoints:  # no checkpoint at all: the rerun starts over
        directory = "run/checkpoints"
        newest_good = resume_candidate = staticmethod(lambda: None)

    m = {"loss": loss, "grad_norm": grad_norm}
    text = nonfinite.message(7, m, nonfinite.what(m), Checkpoints(), [])
    assert text.startswith(f"step 7: {what}; stopped without saving. No checkpoint remains"), text
    assert nonfinite.what({"loss": 2.0, "grad_norm": 1.0}) == ""


@pytest.mark.slow  # ~20 s on an idle 2-core machine: one train.py process
def test_nan_on_a_checkpoint_step_is_never_saved(tmp_path):
    """Metrics are fetched one step late, but a step due for a checkpoint is finished (its loss checked) before it is
    saved. lr 1e30 after a 2-step warmup: step 1 has lr 0, step 2's update overflows, step 3's loss is non-finite."""
    model_dir = tmp_path / "run"
    proc = subprocess.run(train_cmd(model_dir, "--gin.CHECKPOINT_EVERY=1", "--gin.OptimizerConfig.learning_rate=1e30"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "train.py: error: step 3: non-finite " in proc.stderr and "stopped without saving" in proc.stderr
    saved = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 3
    assert [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
