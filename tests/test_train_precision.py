"""Mixed precision: fp32 master weights and Adam moments with bf16 compute (what the shipped TPU configs train with),
the optional bf16 first moment, bf16 Hugging Face weights imported into fp32 masters and exported in the requested
dtype, and the refusal of bf16 parameters for training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from models import hf_io
from models.config import ModelConfig
from models.sharding import make_mesh
from models.transformer import Transformer
from trainer import config, export, initialize, optimizer, state as state_lib, step as step_lib
from trainer.run_config import OptimizerConfig

SHIPPED_TPU_MODELS = ("llama3_1_8b", "llama3_2_1b", "qwen3_0_6b")
# Small shapes, pretrained-scale values: kernels and the (tied) embedding ~ N(0, 0.02), norm scales 1.
SMALL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True, init_std=0.02)
LR = 2e-5  # runs/midtrain.gin


def shipped_dtypes(name: str) -> tuple[str, str]:
    """(param_dtype, compute_dtype) of a shipped model config, loaded as a run (so it passes the training checks)."""
    run = config.load(["runs/demo.gin", f"models/{name}.gin"], ["MODEL_DIR = 'unused'"])
    return run.model.param_dtype, run.model.compute_dtype


def batch(rows: int = 4, seq: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, SMALL.vocab_size, (rows, seq)).astype(np.int32),
            "segment_ids": np.ones((rows, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
            "loss_mask": np.ones((rows, seq), np.float32), "component": np.zeros(rows, np.int32)}


def one_step(model: ModelConfig, mu_dtype: str | None = None):
    """(params before, state after) of one AdamW step at the midtraining learning rate (constant, no warmup)."""
    oc = OptimizerConfig(learning_rate=LR, schedule="constant", warmup_steps=0, mu_dtype=mu_dtype)
    tx = optimizer.make(oc, 10)
    state = state_lib.create(model, tx, seed=0)
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    step = jax.jit(functools.partial(step_lib.train_step, graphdef=state_lib.model_graphdef(model), tx=tx,
                                     lr_schedule=optimizer.schedule(oc, 10),
                                     config=step_lib.StepConfig(num_components=1)))
    after, metrics = step(state, batch())
    assert np.isfinite(float(metrics["loss"]))
    return before, after


def changed_fraction(before, after) -> float:
    leaves = [np.asarray(x) for x in jax.tree.leaves(after.params)]
    return sum(int((a != b).sum()) for a, b in zip(before, leaves)) / sum(a.size for a in leaves)


def moment_dtypes(state) -> set[str]:
    """dtypes of every parameter-shaped leaf of the optimizer state (Adam's mu and nu)."""
    shapes = {x.shape for x in jax.tree.leaves(state.params)}
    return {str(x.dtype) for x in jax.tree.leaves(state.opt_state) if x.shape in shapes and x.ndim}


@pytest.mark.parametrize("name", SHIPPED_TPU_MODELS)
def test_shipped_tpu_configs_train_fp32_masters_with_bf16_compute(name):
    assert shipped_dtypes(name) == ("float32", "bfloat16")


def test_one_bf16_compute_step_moves_essentially_every_weight():
    """The issue's failure: with bf16 parameters an update of ~lr (Adam's first step is lr * sign(g)) is below half a
    bf16 ulp for every |w| > ~0.005 and is rounded away. fp32 masters keep it."""
    param_dtype, compute_dtype = shipped_dtypes("llama3_1_8b")
    model = SMALL.replace(param_dtype=param_dtype, compute_dtype=compute_dtype)
    before, after = one_step(model)
    matrices = np.concatenate([np.abs(b).ravel() for b in before if b.ndim == 2 or b.ndim == 3])
    assert np.mean(matrices > 0.005) > 0.75          # the premise: most weights are pretrained-scale
    assert {str(x.dtype) for x in jax.tree.leaves(after.params)} == {"float32"}
    assert moment_dtypes(after) == {"float32"}
    assert changed_fraction(before, after) > 0.99

    # The same step with today's bf16 parameters (and so bf16 moments) loses most of the update.
    old_before, old_after = one_step(model.replace(param_dtype="bfloat16"))
    assert moment_dtypes(old_after) == {"bfloat16"}
    assert changed_fraction(old_before, old_after) < 0.5


def test_bf16_first_moment_is_an_explicit_choice():
    before, after = one_step(SMALL.replace(compute_dtype="bfloat16"), mu_dtype="bfloat16")
    mu, nu = [s for s in jax.tree.leaves(after.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
              if hasattr(s, "mu")][0][1:3]
    assert {str(x.dtype) for x in jax.tree.leaves(mu)} == {"bfloat16"}
    assert {str(x.dtype) for x in jax.tree.leaves(nu)} == {"float32"}
    assert {str(x.dtype) for x in jax.tree.leaves(after.params)} == {"float32"}
    assert changed_fraction(before, after) > 0.99


def test_bf16_params_for_training_are_refused():
    with pytest.raises(config.ConfigError, match=r"ModelConfig.param_dtype='bfloat16'.*float32"):
        config.load(["runs/demo.gin", "models/tiny.gin"], ["MODEL_DIR = 'unused'",
                                                          "ModelConfig.param_dtype = 'bfloat16'"])
    with pytest.raises(config.ConfigError, match="OptimizerConfig.mu_dtype"):
        config.load(["runs/demo.gin"], ["MODEL_DIR = 'unused'", "OptimizerConfig.mu_dtype = 'float16'"])


def test_bf16_hf_weights_import_into_fp32_masters_and_export_in_either_dtype(tmp_path):
    source = SMALL.replace(param_dtype="bfloat16")
    hf_io.save_pretrained(Transformer(source, rngs=nnx.Rngs(3)), tmp_path / "hf", dtype="bfloat16")
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert {v.dtype.name for v in stored.values()} == {"bfloat16"}

    wanted = SMALL.replace(compute_dtype="bfloat16")    # what a shipped TPU config asks for
    params, effective = initialize.load_params(tmp_path / "hf", wanted, make_mesh(devices=jax.devices()[:1]))
    assert (effective.param_dtype, effective.compute_dtype) == ("float32", "bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float32"}
    tx = optimizer.make(OptimizerConfig(learning_rate=LR), 10)
    state = state_lib.create(effective, tx, 0, params)
    assert moment_dtypes(state) == {"float32"}
    embedding = np.asarray(nnx.to_pure_dict(params)["embed"]["embedding"])
    np.testing.assert_array_equal(embedding, stored["model.embed_tokens.weight"].astype(np.float32))  # exact

    model = nnx.merge(state_lib.model_graphdef(effective), params)
    for dtype in ("bfloat16", "float32"):
        out = export.export(model, tmp_path / dtype, dtype=dtype)
        exported = load_file(out / "model.safetensors")
        assert {v.dtype.name for v in exported.values()} == {dtype}
        for name, value in stored.items():  # bf16 -> fp32 master -> either dtype loses nothing
            np.testing.assert_array_equal(exported[name].astype(np.float32), value.astype(np.float32))
    reloaded = jnp.asarray(nnx.to_pure_dict(nnx.state(hf_io.load_pretrained(tmp_path / "float32")[0], nnx.Param))
                           ["embed"]["embedding"])
    np.testing.assert_array_equal(np.asarray(reloaded), embedding)
