"""train.py as several real JAX processes on localhost (jax.distributed, gloo CPU collectives), the mesh spanning
processes: the same losses and exports as one process, each host parsing only its own documents, exact resume after
SIGKILL, a checkpoint of 2 processes resumed by 1 and the reverse, and SIGTERM to one process, a data cap on one host
and a NaN loss each stopping every process at the same step (with 2 and 4 processes).

All runs use the tiny model with a 32-row global batch, which MixtureConfig splits into 4 data shards by default
(data.config.default_num_shards, whatever the process count), so 1 process x 4 devices, 2 x 2 and 4 x 1 train on the
same global batches. The runs share the suite's persistent compilation cache (conftest.py).
"""
import argparse
import json
import pathlib
import re
import shutil
import signal

import numpy as np
import pytest

from tests import multiproc
from tests.multiproc import Cluster, logged_steps, losses

pytestmark = pytest.mark.slow
STEPS = 8
ARGS = ["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=32", "--gin.SEQ_LEN=32",
        f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_EVERY=2",
        "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=None", "--gin.TrainConfig.peak_flops=1e12",
        "--gin.OptimizerConfig.warmup_steps=2", "--gin.CheckpointConfig.export_every=3",
        "--gin.CheckpointConfig.export_dtype='float32'"]
EXPORTS = ("exports/3", "exports/6", "hf")
TIMEOUT = 600  # per launch; a 2-process run takes ~1-2 min on a loaded 2-core machine
# Same data, same 4-device mesh shape, but the gradient all-reduce crosses a process boundary (gloo) in one run and
# not in the other: fp32 sums in a different order differ in the last bits, and Adam carries that through the steps.
# Measured: losses differ by at most 1 ulp (1.1e-7 relative), exported weights by at most 1.5e-7 after 8 steps. The
# bound leaves 100x room and is far below what a real divergence does (a wrong shard or a missing row moves the loss
# by >1e-3).
RTOL = 1e-5


def args(model_dir: pathlib.Path, *extra: str) -> list[str]:
    return [*ARGS, f"--gin.MODEL_DIR={model_dir}", *extra]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> pathlib.Path:
    """The reference: 1 process x 4 devices."""
    model_dir = tmp_path_factory.mktemp("single") / "run"
    multiproc.run(1, 4, args(model_dir), model_dir.parent / "logs", TIMEOUT)
    return model_dir


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> pathlib.Path:
    """2 processes x 2 devices, uninterrupted."""
    model_dir = tmp_path_factory.mktemp("two") / "run"
    multiproc.run(2, 2, args(model_dir), model_dir.parent / "logs", TIMEOUT)
    return model_dir


def read_export(folder: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


def assert_same_run(got: pathlib.Path, want: pathlib.Path, rtol: float) -> None:
    """Loss curves and every HF export of two runs agree to `rtol`."""
    a, b = losses(got), losses(want)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=rtol, atol=0)
    for name in EXPORTS:
        x, y = read_export(got / name), read_export(want / name)
        assert sorted(x) == sorted(y), name
        for key in x:
            np.testing.assert_allclose(x[key], y[key], rtol=rtol, atol=rtol, err_msg=f"{name}/{key}")
        assert json.loads((got / name / "config.json").read_text()) == json.loads((want / name / "config.json")
                                                                                 .read_text())


def stop_lines(cluster: Cluster) -> list[tuple[int, str]]:
    """(step, reason) from each process's 'stops at step' log line."""
    found = []
    for i in range(cluster.num_processes):
        m = re.search(r"process \d+ of \d+ stops at step (\d+) \((\w+)\)", cluster.stderr(i))
        assert m, f"process {i} logged no stop line:\n{cluster.stderr(i)[-3000:]}"
        found.append((int(m.group(1)), m.group(2)))
    return found


READ_LINE = re.compile(r"process (\d+) of \d+, data shards \[([\d, ]*)\] of (\d+), component '(\w+)': (\d+) records "
                       r"parsed, (\d+) bytes read, (\d+) documents")


def start_up_reads(log_dir: pathlib.Path, num_processes: int) -> dict[str, list[tuple[list[int], int, int]]]:
    """component -> per process (its data shards, records parsed, bytes read), from each process's start-up log."""
    found: dict[str, list] = {}
    for i in range(num_processes):
        text = (log_dir / f"process_{i}.err").read_text()
        matches = [m for m in READ_LINE.finditer(text) if int(m.group(1)) == i]
        assert matches, f"process {i} logged no start-up read line:\n{text[-3000:]}"
        for m in matches:
            shards = [int(x) for x in m.group(2).split(",") if x.strip()]
            found.setdefault(m.group(4), []).append((shards, int(m.group(5)), int(m.group(6))))
    return found


def assert_each_host_reads_its_own_shards(split: dict, whole: dict, num_processes: int) -> None:
    """Each process parsed and read only its own shards: together exactly the one-process run's records, each about
    1/num_processes of them (byte ranges split by line starts, so not exactly), and no shard read twice."""
    assert sorted(split) == sorted(whole)
    for name, per_process in split.items():
        (all_shards, records, nbytes), = whole[name]
        assert sorted(s for shards, _, _ in per_process for s in shards) == all_shards, name
        assert sum(r for _, r, _ in per_process) == records, name
        for _, r, b in per_process:
            assert 0 < r < 1.5 * records / num_processes and 0 < b < 1.5 * nbytes / num_processes, (name, per_process)


def saved_by(model_dir: pathlib.Path, step: int) -> list[str]:
    """The processes whose data-iterator state is in checkpoint `step` (each process writes its own file)."""
    return sorted(p.name for p in (model_dir / "checkpoints" / str(step) / "data").glob("process_*"))


def test_two_processes_match_one_process_and_export_loads_in_transformers(single, two):
    assert_same_run(two, single, RTOL)
    assert saved_by(two, STEPS) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert_each_host_reads_its_own_shards(start_up_reads(two.parent / "logs", 2),
                                          start_up_reads(single.parent / "logs", 1), 2)

    import jax.numpy as jnp
    import torch
    import transformers

    from trainer.checkpoint import restore_model

    tokens = np.array([[1, 57, 300, 12, 999, 4000, 5, 77]], np.int32)
    for export, checkpoint in (("exports/6", two / "checkpoints" / "6"), ("hf", two)):  # float32 exports
        model, _, _ = restore_model(checkpoint)
        ours = np.asarray(model(jnp.asarray(tokens)))
        hf = transformers.AutoModelForCausalLM.from_pretrained(two / export, dtype=torch.float32)
        with torch.no_grad():
            theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0, err_msg=export)


def copy_until(run: pathlib.Path, to: pathlib.Path, step: int) -> None:
    """`run` as it was after `step` (its checkpoints, exports and metrics up to there): a run preempted at `step`."""
    shutil.copytree(run, to)
    for folder in [*(to / "checkpoints").iterdir(), *(to / "exports").iterdir(), to / "hf"]:
        if not folder.name.isdigit() or int(folder.name) > step:
            shutil.rmtree(folder)
    records = [line for line in (to / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (to / "metrics.jsonl").write_text("\n".join(records) + "\n")


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(single, two, tmp_path, before, after):
    """Preempted at step 6 with `before` processes (its newest checkpoint but one), resumed with `after`: the same
    global data (the realized token counts per component equal the uninterrupted run's at every step), and losses and
    exports as the uninterrupted run's to RTOL (the gradient sums cross processes in another order after the
    resume)."""
    model_dir = tmp_path / "run"
    copy_until(two if before == 2 else single, model_dir, 6)
    assert len(saved_by(model_dir, 6)) == before
    cluster = multiproc.run(after, 4 // after, args(model_dir), tmp_path / "logs", TIMEOUT)
    assert re.search(r"resuming from \S+/checkpoints/6", cluster.stderr(0)), cluster.stderr(0)[-3000:]
    assert_same_run(model_dir, single, RTOL)
    tokens = lambda run: [{k: v for k, v in r.items() if k.startswith("tokens/")}  # noqa: E731
                          for r in multiproc.metrics(run)]
    assert tokens(model_dir) == tokens(single) and tokens(model_dir)[-1]
    assert len(saved_by(model_dir, STEPS)) == after


def test_sigterm_to_one_process_stops_all_then_sigkill_all_resumes_exactly(two, tmp_path):
    model_dir = tmp_path / "run"
    cmd = args(model_dir)
    with Cluster(2, 2, cmd, tmp_path / "logs_term") as cluster:
        cluster.wait_until(lambda: logged_steps(model_dir) >= 2, TIMEOUT, "step 2")
        cluster.kill(signal.SIGTERM, which=[1])
        assert cluster.wait(TIMEOUT) == [0, 0], cluster.report("SIGTERM to process 1")
        (saved, reason), other = stop_lines(cluster)
        assert other == (saved, reason) and reason == "preempted"
    assert 2 <= saved < STEPS - 1
    assert saved_by(model_dir, saved) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert max(losses(model_dir)) == saved

    # SIGKILL both once a step past the checkpoint is logged. The last steps take ~0.2 s each, and a loaded CI worker
    # can be off the CPU longer than that: a relaunch that got to its end before the kill is redone from the preempted
    # state.
    preempted = tmp_path / "preempted"
    shutil.copytree(model_dir, preempted)
    for attempt in range(3):
        with Cluster(2, 2, cmd, tmp_path / f"logs_kill{attempt}") as cluster:
            cluster.wait_until(lambda: max(losses(model_dir), default=0) > saved, TIMEOUT, f"step {saved + 1}")
            cluster.kill(signal.SIGKILL)
            cluster.wait(60)
        killed_at = max(losses(model_dir))
        if killed_at < STEPS:
            break
        shutil.rmtree(model_dir)
        shutil.copytree(preempted, model_dir)
    assert killed_at < STEPS, f"3 relaunches all finished before the kill (preempted at step {saved})"

    cluster = multiproc.run(2, 2, cmd, tmp_path / "logs_resume", TIMEOUT)
    assert re.search(r"resuming from \S+/checkpoints/\d+", cluster.stderr(0)), cluster.stderr(0)[-3000:]
    assert losses(model_dir) == losses(two), f"SIGTERM at {saved}, SIGKILL at {killed_at}"   # bit-identical floats
    for name in EXPORTS:
        assert (model_dir / name / "model.safetensors").read_bytes() == (two / name / "model.safetensors").read_bytes()


def test_four_processes_match_one_process_then_a_nan_stops_all(single, tmp_path):
    model_dir = tmp_path / "run"
    multiproc.run(4, 1, args(model_dir), tmp_path / "logs", TIMEOUT)
    assert_same_run(model_dir, single, RTOL)
    assert saved_by(model_dir, STEPS) == [f"process_{i}-of-4.json" for i in range(4)]
    assert_each_host_reads_its_own_shards(start_up_reads(tmp_path / "logs", 4),
                                          start_up_reads(single.parent / "logs", 1), 4)

    # Continue with an absurd learning rate (a new schedule phase from step 8): step 9's update overflows, step 10's
    # loss is not finite. Every process sees the same (replicated) loss, so all four stop there with exit 1 and
    # nothing is saved from it.
    more = args(model_dir, f"--gin.TRAIN_STEPS={STEPS + 4}", "--gin.OptimizerConfig.learning_rate=1e30",
                f"--gin.OptimizerConfig.schedule_start={STEPS}", "--gin.OptimizerConfig.warmup_steps=0")
    with Cluster(4, 1, more, tmp_path / "logs_nan") as cluster:
        assert cluster.wait(TIMEOUT) == [1] * 4, cluster.report("NaN")
        for i in range(4):
            err = cluster.stderr(i)
            assert f"step {STEPS + 2}: non-finite " in err and "stopped without saving" in err
    assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == STEPS


CAPPED = """
include 'runs/demo.gin'
include 'models/tiny.gin'
MIXTURE_WEIGHTS = {{'capped': 1.0}}
MixtureConfig.components = (@capped/Component(),)
capped/Component.name = 'capped'
capped/Component.paths = ('{path}',)
capped/Component.max_epochs = 1
capped/Component.on_exhausted = 'stop'
capped/Component.shuffle = False
RunConfig.eval_mixture = None
"""


def test_data_cap_on_one_host_stops_every_host_at_the_same_step(tmp_path):
    """A JSONL shard is a contiguous byte range: the file's second half is short documents with a large untokenized
    field, so shard 1 (process 1) holds few tokens and runs out of its single epoch first."""
    from data.pipeline import build
    from trainer import config

    docs = tmp_path / "docs.jsonl"
    words = "the farm report said that the committee would meet again".split()
    with docs.open("w") as f:
        for i in range(24 + 120):
            n, pad = (60, "") if i < 24 else (4, "x" * 300)
            f.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(n)), "pad": pad}) + "\n")
    gin_file = tmp_path / "capped.gin"
    gin_file.write_text(CAPPED.format(path=docs))
    model_dir = tmp_path / "run"
    cmd = [f"--gin_file={gin_file}", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32", "--gin.TRAIN_STEPS=40",
           "--gin.CHECKPOINT_EVERY=100", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.peak_flops=1e12",
           f"--gin.MODEL_DIR={model_dir}"]

    flags = config.add_gin_flags(argparse.ArgumentParser()).parse_args(cmd)
    run = config.load(flags.gin_file, flags.gin_bindings)
    batches = []
    for p in range(2):
        it = build(run.mixture, process_index=p, process_count=2).iterator
        batches.append(sum(1 for _ in zip(it, range(41))))
    assert batches[1] < batches[0] and batches[1] < 40, batches   # process 1 runs out first, before TRAIN_STEPS

    with Cluster(2, 1, cmd, tmp_path / "logs") as cluster:
        assert cluster.wait(TIMEOUT) == [0, 0], cluster.report("data cap")
        assert stop_lines(cluster) == [(batches[1], "data_exhausted")] * 2
    assert max(losses(model_dir)) == batches[1]
    assert saved_by(model_dir, batches[1]) == ["process_0-of-2.json", "process_1-of-2.json"]

    # The same cap with on_exhausted='error', resumed from there: process 1 raises at once, process 0 (with data
    # left) is told so by the vote, naming process 1's error, and both exit 1 without a step.
    with Cluster(2, 1, [*cmd, "--gin.capped/Component.on_exhausted='error'"], tmp_path / "logs_error") as cluster:
        assert cluster.wait(TIMEOUT) == [1, 1], cluster.report("on_exhausted='error'")
        assert "component 'capped' ran out of documents" in cluster.stderr(1)
        assert (f"process 1 of 2 failed while reading its next batch for step {batches[1] + 1}: component 'capped' "
                "ran out of documents") in cluster.stderr(0)
    assert max(losses(model_dir)) == batches[1]

    # Bad input in process 1's byte range only: it fails while opening its shards, and process 0 (whose shards are
    # fine) is told so by the set-up vote instead of waiting in the first collective for a peer that never comes;
    # both exit with process 1's code.
    bad = tmp_path / "bad.jsonl"
    with bad.open("w") as f:
        for i in range(120):
            f.write(json.dumps({"text": " ".join(words)}) + "\n" if i < 60 else "{not json: " + "y" * 60 + "\n")
    with Cluster(2, 1, [*cmd[:-1], f"--gin.MODEL_DIR={tmp_path / 'bad_run'}", f"--gin.capped/Component.paths=('{bad}',)",
                        "--gin.MixtureConfig.max_bad_records=5"], tmp_path / "logs_bad") as cluster:
        codes = cluster.wait(TIMEOUT)
        assert "component 'capped': " in cluster.stderr(1) and "bad records" in cluster.stderr(1), cluster.report("")
        assert ("process 1 of 2 failed while checking the run and opening its data shards: component 'capped': "
                in cluster.stderr(0)), cluster.report("bad")
        assert codes == [2, 2], cluster.report("bad input on one host")
