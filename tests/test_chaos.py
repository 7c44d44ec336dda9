"""A short chaos soak (tests/chaos.py) of a one-process run: SIGTERM during start-up, SIGKILL while a checkpoint and
while an export is written, then relaunched until it ends: every exit code on the table, the user's files kept, no
lock left, and every logged loss and every export bit-equal to an uninterrupted run's. BENCHMARKS.md records a long
soak of one- and two-process runs (`python -m tests.chaos --kills 200`). A kill while step 8 is exported after its
checkpoint committed (where the soak's export kills land only by chance) is made on a copy of the finished run."""
import random
import shutil

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
