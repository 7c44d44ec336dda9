"""The output head + loss on CPU: all logits at once (trainer.loss.predicting_loss_sums) vs in sequence blocks
(trainer.loss.chunked_loss_sums), forward and backward, in one process.

    python bench/bench_loss.py [--shape smollm2_135m] [--chunks 64 128 256] [--steps 5]

Times jax.value_and_grad of the loss with respect to the hidden states and the output kernel (what the train step
differentiates through the head) and reads the compiled program's temporary memory. Random inputs.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import median_seconds  # noqa: E402
from trainer import loss as loss_lib  # noqa: E402

SHAPES = {"demo": (8, 128, 128, 6000), "smollm2_135m": (4, 256, 576, 49152), "llama3_2_1b": (1, 2048, 2048, 128256)}


def measure(fn, args, steps: int) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    return {"step_s": median_seconds(compiled, *args, repeats=steps),
            "temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    batch, seq, embed, vocab = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, embed)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(embed, vocab)) * 0.02, jnp.float32)
    data = {"tokens": jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32),
            "segment_ids": jnp.ones((batch, seq), jnp.int32), "loss_mask": jnp.ones((batch, seq), jnp.float32),
            "component": jnp.zeros((batch,), jnp.int32)}

    def full(h, k):
        logits = jnp.einsum("bse,ev->bsv", h[:, :-1], k, preferred_element_type=jnp.float32)
        return loss_lib.predicting_loss_sums(logits, data, 1).loss

    results = {"shape": dict(batch=batch, seq=seq, embed=embed, vocab=vocab),
               "full": measure(jax.value_and_grad(full, argnums=(0, 1)), (hidden, kernel), args.steps)}
    for chunk in args.chunks:
        chunked = lambda h, k, c=chunk: loss_lib.chunked_loss_sums(h, k, data, 1, c).loss  # noqa: E731
        results[f"chunk_{chunk}"] = measure(jax.value_and_grad(chunked, argnums=(0, 1)), (hidden, kernel), args.steps)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
