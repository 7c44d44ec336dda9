"""SIGTERM saves a checkpoint and exits 0 promptly; a non-finite loss stops the run (exit 1) without writing a checkpoint,
leaving the last good one byte-for-byte intact."""
import hashlib
import json
import signal
import subprocess
import time

import pytest

from tests.test_train_resume import REPO, env, train_cmd


def tree_digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow  # ~40 s on an idle 2-core machine: two train.py processes
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

    # Resume the same run with an absurd learning rate: step saved+1 is computed from good params (finite loss),
    # its update overflows, and step saved+2 has a non-finite loss.
    proc = subprocess.run(train_cmd(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_EVERY=100000",
                                    "--gin.OptimizerConfig.learning_rate=1e30"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stopped without saving" in proc.stderr and f"checkpoints/{saved}" in proc.stderr
    assert sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == [steps[0]]
    assert tree_digest(good) == digest
