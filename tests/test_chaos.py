"""A short chaos soak (tests/chaos.py) of a one-process run: SIGTERM during start-up, SIGKILL while a checkpoint and
while an export is written, then relaunched until it ends: every exit code on the table, the user's files kept, no
lock left, and every logged loss and every export bit-equal to an uninterrupted run's. BENCHMARKS.md records a long
soak of one- and two-process runs (`python -m tests.chaos --kills 200`). A kill while step 8 is exported after its
checkpoint committed (where the soak's export kills land only by chance) is made on a copy of the finished run, and
SIGTERM to one process of two during start-up is checked on its own."""
import random
import shutil
import signal

import pytest

from tests import chaos, multiproc


@pytest.mark.slow  # a reference run and 5 launches of the tiny model
def test_a_short_soak_resumes_bit_exact_and_keeps_to_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))  # launches after the first compile less
    seed = random.SystemRandom().randrange(2**32)
    report = chaos.soak(tmp_path, len(chaos.PLAN[1]), 0, seed, processes=(1,), log=print)
    summary = report.summary()
    assert not report.problems, f"seed {seed}: {summary}"
    assert report.runs == report.exact == 1, f"seed {seed}: {summary}"
    made = [(k.moment, k.signal) for k in report.kills]  # the moments seen when the signals were sent
    assert made == [(s.moment, s.signal.name) for s in chaos.PLAN[1]], f"seed {seed}: {summary}"

    # Killed while exporting step 8, after checkpoint 8 committed and before checkpoint 10: the relaunch resumes at 8
    # and makes that export first.
    reference = tmp_path / "reference_1p" / "run"
    run = tmp_path / "killed_exporting_8" / "run"
    shutil.copytree(reference, run)
    for name in ("checkpoints/10", "exports/8", "hf"):
        shutil.rmtree(run / name)
    multiproc.run(1, chaos.devices(1), chaos.command_args(run, 1), run.parent / "logs", chaos.LAUNCH_TIMEOUT)
    assert chaos.compare(run, reference) == []


@pytest.mark.slow  # two processes to their first step
def test_sigterm_to_one_process_during_start_up_stops_both_before_the_first_step(tmp_path):
    """After jax.distributed.initialize, whose preemption notifier takes SIGTERM below Python, until the loop starts
    (reading data, compiling): the signal still stops both processes at step 0, exit 0."""
    model_dir = tmp_path / "run"
    with multiproc.Cluster(2, 1, chaos.command_args(model_dir, 2), tmp_path / "logs") as cluster:
        cluster.wait_until(lambda: (model_dir / "writer.lock").exists(), chaos.LAUNCH_TIMEOUT, "the writer lock")
        cluster.kill(signal.SIGTERM, [1])
        assert cluster.wait(chaos.LAUNCH_TIMEOUT) == [0, 0], cluster.report("SIGTERM to process 1")
        for i in range(2):
            assert f"process {i} of 2 stops at step 0 (preempted)" in cluster.stderr(i), cluster.report("step 0")
