"""trainer.loss / optimizer / step: the loss formula against numpy, SFT masking, schedules, the decay mask, and the
sharded step against one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ModelConfig
from models import sharding
from models.sharding import make_mesh
from trainer import loss as loss_lib
from trainer import optimizer, state as state_lib, step as step_lib
from trainer.run_config import OptimizerConfig

TINY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=False)


def numpy_loss(logits, tokens, seg, mask, component, num_components):
    logits = logits.astype(np.float64)
    total, weight = 0.0, 0.0
    per_loss, per_weight = np.zeros(num_components), np.zeros(num_components)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            w = mask[b, t + 1] * (seg[b, t + 1] == seg[b, t]) * (seg[b, t + 1] > 0)
            row = logits[b, t]
            ce = np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[b, t + 1]]
            total += w * ce
            weight += w
            per_loss[component[b]] += w * ce
            per_weight[component[b]] += w
    return total, weight, per_loss, per_weight


def test_loss_matches_numpy_and_never_crosses_documents():
    rng = np.random.default_rng(0)
    B, S, V = 3, 10, 7
    logits = rng.normal(size=(B, S, V)).astype(np.float32)
    tokens = rng.integers(0, V, (B, S)).astype(np.int32)
    seg = np.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3, [3] * 10], np.int32)
    mask = (seg > 0).astype(np.float32) * rng.uniform(0.5, 2.0, (B, S)).astype(np.float32)
    component = np.array([0, 1, 1], np.int32)
    sums = loss_lib.predicting_loss_sums(jnp.asarray(logits)[:, :-1], dict(tokens=tokens, segment_ids=seg, loss_mask=mask,
                                                        component=component), 2)
    total, weight, per_loss, per_weight = numpy_loss(logits, tokens, seg, mask, component, 2)
    np.testing.assert_allclose(float(sums.loss), total, rtol=1e-5)
    np.testing.assert_allclose(float(sums.weight), weight, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sums.per_component_loss), per_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sums.per_component_weight), per_weight, rtol=1e-6)
    w = np.asarray(loss_lib.target_weights(jnp.asarray(seg), jnp.asarray(mask)))
    assert w[0, 3] == 0 and w[0, 4] > 0       # the first token of document 2 is not a target of document 1
    assert (w[1, 6:] == 0).all()               # padding is never a target


def test_sft_mask_only_assistant_tokens_carry_gradient():
    """Prompt tokens (loss_mask 0) are never targets: logits predicting them get zero gradient."""
    rng = np.random.default_rng(1)
    B, S, V = 2, 8, 11
    tokens = rng.integers(0, V, (B, S)).astype(np.int32)
    seg = np.ones((B, S), np.int32)
    mask = np.zeros((B, S), np.float32)
    mask[:, 5:] = 1.0                          # "assistant" tokens are positions 5..7
    batch = dict(tokens=tokens, segment_ids=seg, loss_mask=mask, component=np.zeros(B, np.int32))
    logits = jnp.asarray(rng.normal(size=(B, S, V)).astype(np.float32))
    grad = jax.grad(lambda x: loss_lib.predicting_loss_sums(x[:, :-1], batch, 1).loss)(logits)
    norms = np.abs(np.asarray(grad)).sum(-1)
    assert (norms[:, :4] == 0).all() and (norms[:, 4:7] > 0).all() and (norms[:, 7] == 0).all()


def test_schedules():
    total = 100
    cos = optimizer.schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), total)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5) and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(total)) == pytest.approx(0.1) and 0.1 < float(cos(55)) < 1.0
    wsd = optimizer.schedule(OptimizerConfig(learning_rate=2.0, schedule="warmup_stable_decay", warmup_steps=10,
                                             decay_fraction=0.2, min_lr_ratio=0.0), total)
    assert [float(wsd(s)) for s in (10, 50, 80)] == pytest.approx([2.0, 2.0, 2.0])
    assert float(wsd(90)) == pytest.approx(1.0) and float(wsd(100)) == pytest.approx(0.0)
    const = optimizer.schedule(OptimizerConfig(learning_rate=0.5, schedule="constant"), total)
    assert float(const(0)) == float(const(99)) == 0.5


def test_a_run_shorter_than_its_warmup_is_warned():
    """5 steps of a 20-step warm-up: the warm-up is cut to the run, so the learning rate only rises, to 80% of the
    peak at the last step (the schedule's own value); a phase started by schedule_start counts from that step."""
    cfg = OptimizerConfig(learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=20)
    note = optimizer.warmup_note(cfg, 5)
    assert "the run's 5 steps are shorter than its learning-rate warm-up (OptimizerConfig.warmup_steps = 20)" in note
    assert "to 80% of OptimizerConfig.learning_rate" in note
    assert float(optimizer.schedule(cfg, 5)(4)) == pytest.approx(0.8e-3)
    assert optimizer.warmup_note(cfg, 20) is None and optimizer.warmup_note(cfg, 400) is None
    assert "run's 10 steps" in optimizer.warmup_note(OptimizerConfig(warmup_steps=20, schedule_start=90), 100)


def test_decay_mask_excludes_norms_and_embeddings():
    model = nnx.eval_shape(lambda: state_lib.Transformer(TINY, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mask = optimizer.decay_mask(params, ("norm", "bias", "embed"))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(v for k, v in flat.items() if "norm" in k or "embed" in k)
    assert all(v for k, v in flat.items() if "proj" in k or "lm_head" in k)


def make_batches(n, B, S, V, num_components, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seg = np.ones((B, S), np.int32)
        seg[:, S // 2:] = 2
        seg[0, -3:] = 0
        pos = np.concatenate([np.arange(S // 2), np.arange(S - S // 2)])[None].repeat(B, 0).astype(np.int32)
        out.append(dict(tokens=rng.integers(0, V, (B, S)).astype(np.int32), segment_ids=seg, positions=pos,
                        loss_mask=(seg > 0).astype(np.float32),
                        component=(np.arange(B) % num_components).astype(np.int32)))
    return out


def run_steps(devices, mesh_axes, microbatches, batches, oc, steps):
    mesh = make_mesh(devices=devices, **mesh_axes)
    tx = optimizer.make(oc, steps)
    state = state_lib.init_sharded(TINY, tx, 0, mesh)
    B = batches[0]["tokens"].shape[0]
    fn = step_lib.jit_train_step(sharding.state_shardings(state, mesh), mesh, B,
                                 graphdef=state_lib.model_graphdef(TINY),
                                 tx=tx, lr_schedule=optimizer.schedule(oc, steps),
                                 config=step_lib.StepConfig(num_components=2, microbatches=microbatches, z_loss=1e-4))
    losses = []
    shardings = step_lib.batch_shardings(mesh, B)
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = fn(state, {k: jax.device_put(v, shardings[k]) for k, v in batch.items()})
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


@pytest.mark.slow  # ~25 s on an idle 2-core machine: two init and two step compilations
def test_sharded_and_accumulated_steps_match_one_device():
    """8 fake devices (data=2, fsdp=2, tensor=2) with 2 accumulated microbatches vs 1 device, one batch per step."""
    oc = OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
    batches = make_batches(4, 8, 16, TINY.vocab_size, 2)
    one_losses, one_params = run_steps(jax.devices()[:1], {}, 1, batches, oc, 4)
    assert one_losses[-1] < one_losses[0]
    losses, params = run_steps(jax.devices()[:8], {"data": 2, "fsdp": 2, "tensor": 2}, 2, batches, oc, 4)
    np.testing.assert_allclose(losses, one_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, one_params)
