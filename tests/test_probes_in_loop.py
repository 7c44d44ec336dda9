"""In-loop probes (TrainConfig.probe_sets) through train.py: the margins logged at each scored step are exactly what
eval.probes computes from that step's checkpoint on the same mesh (one process, and a pod of two), step 0 scores the
starting parameters, a run killed and resumed logs every scored step once with the same numbers, and the records
reach metrics.jsonl and TensorBoard."""
import contextlib
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import multiproc

REPO = pathlib.Path(__file__).resolve().parents[1]
WELFARE, CONTROL = "eval/probe_sets/animal_welfare.jsonl", "eval/probe_sets/neutral_control.jsonl"
STEPS, EVERY = 6, 2
TINY = ["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32",
        f"--gin.TRAIN_STEPS={STEPS}", f"--gin.CHECKPOINT_EVERY={EVERY}", "--gin.TrainConfig.log_every=1",
        "--gin.TrainConfig.eval_every=None", "--gin.TrainConfig.peak_flops=1e12",
        f"--gin.CheckpointConfig.keep_every={EVERY}", "--gin.CheckpointConfig.export_at_end=False",
        f"--gin.TrainConfig.probe_sets=('{WELFARE}',)", f"--gin.TrainConfig.probe_control='{CONTROL}'",
        f"--gin.TrainConfig.probe_every={EVERY}"]
NAMES = ("animal_welfare", "neutral_control")
SCORED = list(range(0, STEPS + 1, EVERY))


def records(model_dir: pathlib.Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (model_dir / name).read_text().splitlines()]


def train_cmd(model_dir: pathlib.Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *TINY, f"--gin.MODEL_DIR={model_dir}"]


def process_env() -> dict[str, str]:
    return multiproc.process_env(2)


def kill_after(model_dir: pathlib.Path, logged: int, checkpoint: int) -> bool:
    """Starts train.py and SIGKILLs it once `logged` metrics records are written and checkpoint `checkpoint` is
    committed (Orbax renames its folder into place); False when the run finished first."""
    proc = subprocess.Popen(train_cmd(model_dir), cwd=REPO, env=process_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    path, deadline = model_dir / "metrics.jsonl", time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if (path.exists() and len(path.read_text().splitlines()) >= logged
                    and (model_dir / "checkpoints" / str(checkpoint)).is_dir()):
                break
            time.sleep(0.01)
        finished = proc.poll() is not None
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have ended by itself
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return not finished and len(path.read_text().splitlines()) < STEPS + 1


def tensorboard_scalars(tb_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files (TFRecord framing: length, its crc, an Event proto, its crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in tb_dir.glob("events.out.tfevents*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at: at + 8])
            event = event_pb2.Event.FromString(data[at + 12: at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def scored_on_mesh(checkpoint: pathlib.Path, devices: int) -> list[np.ndarray]:
    """eval.probes on one checkpoint, its parameters placed on a mesh shaped like the run's (`devices` devices)."""
    import jax

    from eval import probe_pairs, probes
    from models import sharding

    mesh = sharding.make_mesh(fsdp=-1, devices=jax.devices()[:devices])
    return probes.score_model(checkpoint, [probe_pairs.read_pairs(REPO / WELFARE), probe_pairs.read_pairs(REPO / CONTROL)],
                              mesh=mesh)


def assert_logged_as_scored(model_dir: pathlib.Path) -> dict[int, dict]:
    """Every scored step once, in probes.jsonl (per pair) and in metrics.jsonl (their summaries); returns the
    per-pair records by step."""
    per_pair = {r["step"]: r for r in records(model_dir, "probes.jsonl")}
    assert [r["step"] for r in records(model_dir, "probes.jsonl")] == SCORED
    logged = [r for r in records(model_dir, "metrics.jsonl") if "probe/seconds" in r]
    assert [r["step"] for r in logged] == SCORED
    assert sorted(r["step"] for r in records(model_dir, "metrics.jsonl")) == list(range(STEPS + 1))
    base = per_pair[0]["margins"]
    for rec in logged:
        m = per_pair[rec["step"]]["margins"]
        assert per_pair[rec["step"]]["control"] == "neutral_control"
        for name in NAMES:
            assert rec[f"probe/{name}/margin"] == np.mean(m[name])
            assert rec[f"probe/{name}/accuracy"] == np.mean(np.array(m[name]) > 0)
        shift = (np.mean(m["animal_welfare"]) - np.mean(base["animal_welfare"])
                 - (np.mean(m["neutral_control"]) - np.mean(base["neutral_control"])))
        assert rec["probe/animal_welfare/shift_minus_control"] == pytest.approx(shift, abs=1e-12)
    return per_pair


@pytest.mark.slow  # ~90 s on a loaded 2-core machine: a tiny run killed, resumed, then three checkpoints scored
def test_in_loop_margins_equal_eval_probes_on_each_checkpoint_through_a_kill_and_resume(tmp_path):
    model_dir = tmp_path / "run"
    for attempt in range(3):  # a fresh run when the kill came after the run's end
        if kill_after(model_dir, logged=4, checkpoint=2):  # steps 0-3 logged; resumes from step 2 or 4
            break
        subprocess.run(["rm", "-rf", str(model_dir)], check=True)
    else:
        pytest.fail("3 runs all finished before the kill")
    proc = subprocess.run(train_cmd(model_dir), cwd=REPO, env=process_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stderr
    per_pair = assert_logged_as_scored(model_dir)

    for step in SCORED[1:]:
        got = scored_on_mesh(model_dir / "checkpoints" / str(step), devices=2)
        for name, margins in zip(NAMES, got):
            np.testing.assert_array_equal(per_pair[step]["margins"][name], margins, err_msg=f"step {step} {name}")

    # The command line on one device: the same margins up to float summation order over another device layout.
    from eval import probe_pairs, probes

    result = probes.main(["--model", str(model_dir / "checkpoints" / str(STEPS)), "--pairs", str(REPO / WELFARE),
                          "--json", "--bootstrap", "100"])
    assert result["overall"]["margin"] == pytest.approx(np.mean(per_pair[STEPS]["margins"]["animal_welfare"]),
                                                        abs=1e-5)


@pytest.mark.slow  # ~60 s on a loaded 2-core machine: two train.py processes, then the last checkpoint scored
def test_two_processes_score_in_loop_exactly_as_eval_probes(tmp_path):
    """A pod of two processes (one device each, the mesh spanning both): every process takes part in the scoring,
    process 0 writes, and the margins are eval.probes' on each checkpoint with the parameters on two devices; the
    summaries reach TensorBoard."""
    model_dir = tmp_path / "run"
    multiproc.run(2, 1, [*TINY, f"--gin.MODEL_DIR={model_dir}"], tmp_path / "logs", timeout=600)
    per_pair = assert_logged_as_scored(model_dir)
    for name, margins in zip(NAMES, scored_on_mesh(model_dir / "checkpoints" / str(STEPS), devices=2)):
        np.testing.assert_array_equal(per_pair[STEPS]["margins"][name], margins, err_msg=name)
    tb = tensorboard_scalars(model_dir / "tb")
    logged = [r for r in records(model_dir, "metrics.jsonl") if "probe/seconds" in r]
    for key in ("probe/animal_welfare/margin", "probe/neutral_control/accuracy",
                "probe/animal_welfare/shift_minus_control"):
        assert tb[key] == pytest.approx({r["step"]: r[key] for r in logged}, rel=1e-6, abs=1e-9)  # float32 there
