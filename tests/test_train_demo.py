"""The embedded default run (`python train.py`), shortened: it trains, evaluates held-out sets, checkpoints, exports and
prints the summary; metrics.jsonl carries the documented keys."""
import json
import subprocess
import sys

import pytest

from tests.test_train_resume import REPO, env

KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "tokens"}


@pytest.mark.slow  # ~35 s on an idle 2-core machine: one train.py process with the demo model
def test_demo_end_to_end(tmp_path):
    model_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"--gin.MODEL_DIR={model_dir}",
                           "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_EVERY=2", "--gin.TrainConfig.eval_every=2",
                           "--gin.TrainConfig.log_every=2", "--gin.CheckpointConfig.export_every=2"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for text in ("stopped at step 4 (done)", "final loss", "replay", "synthetic", "held-out loss", "tokens/s",
                 f"checkpoint   {model_dir}/checkpoints/4", f"HF export    {model_dir}/hf", "python -m eval.generate"):
        assert text in out, out
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    for r in records:
        assert KEYS | {"loss/replay", "loss/synthetic", "tokens/replay", "tokens/synthetic"} <= set(r)
        assert r["tokens/replay"] + r["tokens/synthetic"] == r["tokens"] == r["step"] * 8 * 128
        assert 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0
    assert {"eval/loss/replay", "eval/loss/synthetic", "eval/loss/control"} <= set(records[-1])
    assert sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (model_dir / "hf" / "model.safetensors").is_file() and (model_dir / "config.gin").is_file()
    assert sorted(p.name for p in (model_dir / "exports").iterdir()) == ["2", "4"]
    assert (model_dir / "exports" / "4" / "model.safetensors").read_bytes() == \
        (model_dir / "hf" / "model.safetensors").read_bytes()

    # The summary's held-out losses are eval.heldout's on the same checkpoint and data: whole held-out sets, the
    # same tokens (the summary says how many), the same numbers.
    from eval import heldout

    result = heldout.main(["--model", str(model_dir)])
    for name, r in result["components"].items():
        assert abs(records[-1][f"eval/loss/{name}"] - r["loss"]) < 1e-4, (name, records[-1], r)
        assert f"{name} {r['loss']:.3f} ({r['target_tokens']:,} tokens)" in out, out
        assert r["target_tokens"] > 10_000  # a whole held-out set (~17k-50k tokens), not 2 batches of 1k
