"""GPU check for the attention backends: does `attention="cudnn"` agree with the XLA reference, and how fast is it?

Run on an NVIDIA machine (the device tool): `python bench/gpu_check.py --out results.json`. It prints one JSON object:
per-kernel max-abs error against the float32 XLA reference on packed (multi-segment) rows, and forward tokens/s of a
SmolLM2-135M-shaped model (random weights, bf16 compute) with each backend, median of several runs.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import median_seconds
from models.config import ModelConfig
from models.kernels import AttentionMask, attend, xla_attention


def packed_mask(batch: int, seq: int, docs_per_row: int, rng: np.random.Generator) -> AttentionMask:
    """Rows of `docs_per_row` segments of random length, padding (segment 0) at the end: `[batch, seq]`."""
    segments = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq - 8), docs_per_row, replace=False))
        for i, (start, end) in enumerate(zip([0, *cuts[:-1]], cuts)):
            segments[row, start:end] = i + 1
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    segments = jnp.asarray(segments)
    return AttentionMask(segments, segments, idx, idx[0], None)


def kernel_check(dtype: str, batch: int = 4, seq: int = 2048, heads: int = 16, kv_heads: int = 4,
                 head_dim: int = 128) -> dict:
    rng = np.random.default_rng(0)
    shape_q, shape_kv = (batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in (shape_q, shape_kv, shape_kv))
    mask = packed_mask(batch, seq, 4, rng)
    valid = np.asarray(mask.q_segment != 0)[..., None, None]  # padding queries have no defined output
    reference = np.asarray(xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask))
    result = {}
    for name, fn in {"xla": lambda q, k, v: attend(q, k, v, mask, "xla"),
                     "cudnn": lambda q, k, v: attend(q, k, v, mask, "cudnn"),
                     # Forcing cuDNN tells whether the flash kernel accepts our packed mask or jax fell back to XLA.
                     "cudnn_forced_dense_mask": lambda q, k, v: jax.nn.dot_product_attention(
                         q, k, v, mask=mask.dense()[:, None], implementation="cudnn"),
                     "cudnn_forced_causal_only": lambda q, k, v: jax.nn.dot_product_attention(
                         q, k, v, is_causal=True, implementation="cudnn")}.items():
        try:
            jitted = jax.jit(fn)
            out = np.asarray(jitted(q, k, v).astype(jnp.float32))
            result[name] = {"max_abs_err_vs_fp32_ref": float(np.abs(np.where(valid, out - reference, 0)).max()),
                            "seconds": median_seconds(jitted, q, k, v)}
        except Exception as err:  # report, don't hide: the point is to learn what runs here
            result[name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    return result


def model_check(batch: int = 8, seq: int = 2048) -> dict:
    base = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                       tie_embeddings=True, param_dtype="bfloat16", compute_dtype="bfloat16")
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, base.vocab_size, (batch, seq)), jnp.int32)
    segments = packed_mask(batch, seq, 3, rng).q_segment
    result, logits = {}, {}
    for backend in ("xla", "cudnn"):
        from models.transformer import Transformer

        model = Transformer(base.replace(attention=backend), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, seg))
        try:
            logits[backend] = np.asarray(forward(state, tokens, segments))
            seconds = median_seconds(forward, state, tokens, segments, repeats=5)
            result[backend] = {"tokens_per_s": batch * seq / seconds, "seconds": seconds}
        except Exception as err:
            result[backend] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    if len(logits) == 2:
        valid = np.asarray(segments != 0)[..., None]
        result["cudnn_vs_xla_max_abs_logit_diff"] = float(np.abs(np.where(valid, logits["cudnn"] - logits["xla"], 0)).max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
              "kernel_bf16": kernel_check("bfloat16"), "kernel_fp16": kernel_check("float16"),
              "model_smollm2_shape_bf16": model_check()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
