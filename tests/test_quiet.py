"""What commands do not print: notices about docmix's own deliberate choices, which a user can do nothing about.

- Held-out sets are read once, to their end, at start-up: a lone stream ending is not a component "exhausted".
- Runs are read through read-only Orbax managers (probes, export, resume checks): Orbax's notice about it is dropped.
- On a machine without a TPU, libtpu (the TPU extra) is not probed for one (platforms.py, through exit_codes.run).
"""
from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import pytest

from data.config import Component, single_component_mixture
from data.pipeline import build
from tests.test_data_pipeline import corpus, mixture  # noqa: F401 (a fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]


def drain(pipeline) -> int:
    n = 0
    with pytest.raises(StopIteration):
        while n < 1000:
            next(pipeline.iterator)
            n += 1
    return n


def test_held_out_read_to_its_end_is_silent_and_a_mixture_stop_is_logged(corpus, caplog):
    tiny = Component("tiny", paths=(str(corpus["tiny"]),))
    held_out = single_component_mixture(mixture(corpus, {"short": 0.5, "long": 0.5}, seq_len=4, batch_size=2), tiny,
                                        batch_size=1)
    with caplog.at_level(logging.INFO, logger="data.mixture"):
        assert drain(build(held_out)) > 0
    assert caplog.records == []
    capped = Component("tiny", paths=(str(corpus["tiny"]),), max_epochs=1)
    two = mixture(corpus, {"tiny": 0.5, "short": 0.5}, seq_len=4, batch_size=2, block_size=2,
                  components=(capped, Component("short", paths=(str(corpus["short"]),))))
    with caplog.at_level(logging.INFO, logger="data.mixture"):
        drain(build(two))
    assert [r.getMessage().split(" at row")[0] for r in caplog.records] == [
        "component 'tiny' exhausted (max_epochs=1)"]


def test_reading_a_run_logs_no_read_only_notice(tmp_path, caplog):
    import orbax.checkpoint as ocp

    from trainer import checkpoint

    manager = ocp.CheckpointManager(tmp_path / checkpoint.CHECKPOINTS)
    manager.save(3, args=ocp.args.Composite(metadata=ocp.args.JsonSave({"model": "x"})))
    manager.wait_until_finished()
    manager.close()
    with caplog.at_level(logging.WARNING):
        _, _, step, meta = checkpoint.read_metadata(tmp_path)  # opens two read-only managers
    assert (step, meta) == (3, {"model": "x"})
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.tpu  # libtpu is what would probe
def test_a_command_on_a_machine_without_a_tpu_does_not_probe_for_one(tmp_path):
    """JAX_PLATFORMS unset, libtpu installed, no TPU or GPU: a command (anything run through exit_codes.run) starts
    the CPU backend without libtpu's warnings."""
    import platforms

    if platforms._has_accelerator():
        pytest.skip("this machine has an accelerator: JAX may rightly look for it")
    code = "import exit_codes, jax; exit_codes.run(lambda argv: print(jax.devices()[0].platform), 'prog', [])"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES",
                                                            "TPU_ACCELERATOR_TYPE", "TPU_SKIP_MDS_QUERY")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr
