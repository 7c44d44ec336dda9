"""Sharded models on 8 fake CPU devices give the logits of the single-device model; mesh helper behaviour."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from models import hf_io, sharding
from trainer import state as state_lib
from tests.test_models_util import build_hf, jax_logits, random_tokens


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3")
    build_hf("qwen3", out)
    return out


def _logits_on(model, mesh, tokens):
    with jax.set_mesh(mesh):
        tokens = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"), None)))
        return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))


@pytest.mark.parametrize("axes,scan", [(dict(fsdp=4, tensor=2), True), (dict(data=2, fsdp=4), True),
                                       (dict(fsdp=4, tensor=2), False)])
def test_sharded_logits_match_single_device(qwen3_dir, axes, scan):
    tokens = random_tokens(8, 16)
    reference = jax_logits(hf_io.load_pretrained(qwen3_dir, scan_layers=scan)[0], tokens)
    mesh = sharding.make_mesh(**axes)
    model, _ = hf_io.load_pretrained(qwen3_dir, mesh=mesh, scan_layers=scan)
    q_kernel = model.layers.attn.q_proj.kernel if scan else model.layers[0].attn.q_proj.kernel
    expected = (None,) * scan + (("fsdp", "tensor") if axes.get("tensor") else ("fsdp",))
    assert tuple(q_kernel[...].sharding.spec)[:len(expected)] == expected  # [layers], embed, q_heads, head_dim
    np.testing.assert_allclose(_logits_on(model, mesh, tokens), reference, rtol=0, atol=1e-5)


def test_init_sharded_matches_unsharded_init(qwen3_dir):
    """The train state's random init (trainer.state.init_sharded) is created in the parameters' shardings and equals
    the init on one device."""
    config, tx = hf_io.read_config(qwen3_dir), optax.adamw(1e-3)
    params = nnx.to_pure_dict(state_lib.init_sharded(config, tx, 3, sharding.make_mesh(fsdp=4, tensor=2)).params)
    embedding = params["embed"]["embedding"]
    assert embedding.sharding.spec == P("tensor", "fsdp") and len(embedding.sharding.device_set) == 8
    one_device = state_lib.init_sharded(config, tx, 3, sharding.make_mesh(devices=jax.devices()[:1])).params
    jax.tree.map(np.testing.assert_array_equal, params, nnx.to_pure_dict(one_device))
    abstract = state_lib.abstract(config, tx).params
    assert abstract["embed"]["embedding"].shape == (config.vocab_size, config.hidden_size)


def test_make_mesh():
    mesh = sharding.make_mesh(data=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    multi = sharding.make_mesh(dcn_data=2, data=1, fsdp=2, tensor=-1)
    assert dict(multi.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # the DCN dimension is outermost: each slice (half of the devices) holds one index of the data axis
    assert {d.id for d in multi.devices[0].flat} == set(range(4))
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh(fsdp=-1, tensor=3)
    with pytest.raises(ValueError, match="!= 8 devices"):
        sharding.make_mesh(data=2, fsdp=2, tensor=1)


def test_logical_rules_drop_non_dividing_axes():
    mesh_shape = {"data": 2, "fsdp": 4, "tensor": 2}
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh_shape) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("act_batch", "act_seq"), (8, 5), mesh_shape) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("act_batch",), (2,), mesh_shape) == P("data")
    with pytest.raises(KeyError, match="'nope'"):
        sharding.logical_to_spec(("nope",))
