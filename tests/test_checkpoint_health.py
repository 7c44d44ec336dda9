"""Good-checkpoint records, retention of the newest good checkpoint, and the fallback past damaged or poisoned ones
(trainer.checkpoint_health via Checkpointer), in process on a tiny model."""
import dataclasses
import json
import logging

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from models.sharding import make_mesh
from tests.test_checkpoint_signals import tree_digest
from tests.test_train_step import TINY
from trainer import checkpoint, checkpoint_health, optimizer, state as state_lib
from trainer.run_config import CheckpointConfig, OptimizerConfig

TX = optimizer.make(OptimizerConfig(), 10)


def iterator(position: int = 0):
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(position):
        next(it)
    return it


MESH = make_mesh(devices=jax.devices()[:2], data=1, fsdp=2, tensor=1)
INITIAL = state_lib.init_sharded(TINY, TX, 0, MESH)


def state_at(step: int):
    """A state whose parameters encode `step` (the initial parameters + step)."""
    params = jax.tree.map(lambda x: x + step, INITIAL.params)
    return dataclasses.replace(INITIAL, params=params, step=jax.numpy.asarray(step, jax.numpy.int32))


def save_steps(model_dir, steps, config=CheckpointConfig(async_save=False), good=()):
    mesh = MESH
    ckpt = checkpoint.Checkpointer(model_dir, config, TINY)
    for s in steps:
        ckpt.save(state_at(s), iterator(s), {"step": s})
        if s in good:
            ckpt.mark_good(s)
    ckpt.close()
    return mesh


def resume(model_dir, mesh):
    ckpt = checkpoint.Checkpointer(model_dir, CheckpointConfig(), TINY)
    it = iterator()
    try:
        found = ckpt.restore_resumable(state_lib.abstract(TINY, TX), mesh, it, lambda meta, step: None)
    finally:
        ckpt.close()
    if found is None:
        return None, None
    step, meta, state = found
    assert meta == {"step": step} and int(state.step) == step
    embedding = lambda st: np.asarray(nnx.to_pure_dict(st.params)["embed"]["embedding"])  # noqa: E731
    np.testing.assert_array_equal(embedding(state), embedding(state_at(step)))
    return step, next(it)


def truncate_largest_array_file(step_dir):
    f = max((step_dir / "params").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def remove_metadata_file(step_dir):
    (step_dir / "metadata" / "metadata").unlink()


@pytest.mark.parametrize("damage", [truncate_largest_array_file, remove_metadata_file])
def test_damaged_latest_falls_back_and_is_kept(tmp_path, caplog, damage):
    mesh = save_steps(tmp_path, [2, 4])
    damaged = tmp_path / "checkpoints" / "4"
    damage(damaged)
    digest = tree_digest(damaged)
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path, mesh) == (2, 2)  # the previous committed step, data position included
    kept = tmp_path / checkpoint_health.SET_ASIDE / "4"
    assert not damaged.exists()
    reason = (kept / "reason.txt").read_text()
    (kept / "reason.txt").unlink()
    assert tree_digest(kept) == digest                          # moved as it was, nothing deleted
    assert "damaged" in reason and "damaged" in caplog.text and "checkpoints/4" in caplog.text
    assert len(caplog.text) < 2000                              # a warning line, not a traceback


def test_nothing_moves_when_no_checkpoint_restores(tmp_path):
    mesh = save_steps(tmp_path, [2])
    truncate_largest_array_file(tmp_path / "checkpoints" / "2")
    with pytest.raises(checkpoint.NoResumableCheckpoint, match="Nothing was moved"):
        resume(tmp_path, mesh)
    assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / checkpoint_health.SET_ASIDE).exists()


def test_retention_keeps_the_newest_good_checkpoint(tmp_path):
    # keep_latest=1: saving 3 would delete 2, but only 2 was verified (step 3's loss, from its parameters, was finite).
    save_steps(tmp_path, [1, 2, 3], CheckpointConfig(keep_latest=1, async_save=False), good=(1, 2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    record = json.loads((tmp_path / "checkpoints" / "2" / checkpoint_health.RECORD).read_text())
    assert record["verdict"] == "good"
    assert not (tmp_path / "checkpoints" / "3" / checkpoint_health.RECORD).exists()   # not verified yet


def test_nonfinite_checkpoints_are_skipped_and_kept(tmp_path):
    mesh = save_steps(tmp_path, [1, 2, 3], CheckpointConfig(keep_latest=5, async_save=False), good=(1,))
    ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(), TINY)
    assert ckpt.mark_nonfinite(2) == [2, 3]
    assert ckpt.newest_good() == 1 and ckpt.resume_candidate() == 1
    ckpt.close()
    assert checkpoint.read_metadata(tmp_path)[2] == 1       # restore_model / convert of the run dir skip them too
    assert resume(tmp_path, mesh) == (1, 1)
    assert sorted(p.name for p in (tmp_path / checkpoint_health.SET_ASIDE).iterdir()) == ["2", "3"]
    assert "non-finite" in (tmp_path / checkpoint_health.SET_ASIDE / "3" / "reason.txt").read_text()
