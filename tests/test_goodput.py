"""train.py accounts for its wall time in MODEL_DIR/goodput.json: a run stopped by SIGTERM, whose last checkpoint is
then lost, resumes from the one before and computes some steps twice; both attempts are recorded, each one's
categories cover its wall time (what no phase names stays under 2%), and the totals sum the attempts."""
import json
import shutil
import signal
import subprocess
import time

import pytest

from tests.test_train_resume import REPO, env, train_cmd

STEPS = 40


def steps_logged(metrics) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def check_attempt(a: dict, external_s: float) -> None:
    seconds = a["seconds"]
    assert abs(sum(seconds.values()) - a["wall_s"]) <= 0.01, a
    assert seconds["other"] <= 0.02 * a["wall_s"], a               # every phase of the run has a category
    assert a["wall_s"] <= external_s, (a, external_s)              # measured inside the process's own lifetime
    for category in ("startup", "compile", "productive", "checkpoint_save", "metrics"):
        assert seconds[category] > 0, (category, a)


@pytest.mark.slow  # two train.py processes of the tiny model: ~35 s at load average 3 on 2 cores
def test_goodput_sums_attempts_and_counts_steps_computed_twice(tmp_path):
    model_dir = tmp_path / "run"
    metrics = model_dir / "metrics.jsonl"
    started = time.perf_counter()
    proc = subprocess.Popen(train_cmd(model_dir, f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_EVERY=2"), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and steps_logged(metrics) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    first_s = time.perf_counter() - started
    assert proc.returncode == 0 and "(preempted)" in out, err[-3000:]
    stopped_at = steps_logged(metrics)
    assert stopped_at < STEPS
    # The preemption's checkpoint is lost (as if the VM went before it was written): the rerun resumes from the one
    # before and computes the steps after it again.
    shutil.rmtree(model_dir / "checkpoints" / str(stopped_at))
    resumed_from = max(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert resumed_from < stopped_at
    started = time.perf_counter()
    done = subprocess.run(train_cmd(model_dir, f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_EVERY=1000"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    second_s = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]

    doc = json.loads((model_dir / "goodput.json").read_text())
    first, second = doc["attempts"]
    assert (first["stopped"], first["first_step"], first["last_step"]) == ("preempted", 0, stopped_at)
    assert (second["stopped"], second["first_step"], second["last_step"]) == ("done", resumed_from, STEPS)
    assert first["steps"] == {"productive": stopped_at, "recomputed": 0}
    assert second["steps"] == {"productive": STEPS - stopped_at, "recomputed": stopped_at - resumed_from}
    check_attempt(first, first_s)
    check_attempt(second, second_s)
    assert first["seconds"]["restore"] == 0 < second["seconds"]["restore"]
    assert first["seconds"]["recomputed"] == 0 < second["seconds"]["recomputed"]
    assert second["seconds"]["export"] > 0                          # the HF export at the end
    total = doc["total"]
    assert total["wall_s"] == pytest.approx(first["wall_s"] + second["wall_s"], abs=0.01)
    for category, s in total["seconds"].items():
        assert s == pytest.approx(first["seconds"][category] + second["seconds"][category], abs=0.01)
    assert total["goodput"] == pytest.approx(total["seconds"]["productive"] / total["wall_s"], abs=1e-4)
    line = next(x for x in done.stdout.splitlines() if x.startswith("goodput "))
    assert f"over 2 attempt(s) ({stopped_at - resumed_from} steps computed twice)" in line
