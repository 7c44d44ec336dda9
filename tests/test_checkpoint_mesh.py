"""Checkpoints restore exactly onto another mesh shape and another layer layout, with the data iterator position."""
import dataclasses

import grain
import jax
import numpy as np
from flax import nnx

from models.sharding import make_mesh
from tests.test_train_step import TINY
from trainer import checkpoint, optimizer, state as state_lib
from trainer.run_config import CheckpointConfig, OptimizerConfig


def test_restore_onto_another_mesh_and_layout(tmp_path):
    tx = optimizer.make(OptimizerConfig(), 10)
    saved_mesh = make_mesh(devices=jax.devices()[:8], data=2, fsdp=4, tensor=1)
    state = state_lib.init_sharded(TINY, tx, 0, saved_mesh)
    state = dataclasses.replace(state, opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # non-trivial moments
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(7):
        next(it)
    ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(), TINY)
    ckpt.save(state, it, {"step": 7})
    ckpt.close()

    unrolled = dataclasses.replace(TINY, scan_layers=False)
    new_mesh = make_mesh(devices=jax.devices()[:8], data=1, fsdp=2, tensor=4)
    fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
    reader = checkpoint.Checkpointer(tmp_path, CheckpointConfig(), unrolled)
    restored = reader.restore(7, state_lib.abstract(unrolled, tx), new_mesh, fresh)
    reader.close()
    assert next(fresh) == 7
    assert int(restored.step) == int(state.step)
    kernel = restored.params["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert kernel[...].sharding.mesh.shape == new_mesh.shape
    before = nnx.to_pure_dict(state.params)
    after = nnx.to_pure_dict(restored.params)
    np.testing.assert_array_equal(np.asarray(after["layers"][1]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(before["layers"]["mlp"]["up_proj"]["kernel"][1]))
    np.testing.assert_array_equal(np.asarray(after["embed"]["embedding"]), np.asarray(before["embed"]["embedding"]))
    mu_before = nnx.to_pure_dict(state.opt_state[1][0].mu)
    mu_after = nnx.to_pure_dict(restored.opt_state[1][0].mu)
    np.testing.assert_array_equal(np.asarray(mu_after["layers"][0]["attn_norm"]["scale"]),
                                  np.asarray(mu_before["layers"]["attn_norm"]["scale"][0]))
