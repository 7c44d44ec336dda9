"""XLA:CPU's float32 matmul against PyTorch's at the shapes of the benchmarked train steps.

    python bench/bench_matmul.py [--reps 30]

Each `[M, K] x [K, N]` product (M = the tokens of a step, K/N = the models' projection sizes) jitted in JAX and run by
torch with all cores, alternating in one process (`bench.timing.interleaved_medians`); prints milliseconds and GFLOP/s.
The demo model's products are small enough that a fixed per-dot cost shows.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_train.py
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import interleaved_medians  # noqa: E402

# (model, what, M, K, N): SmolLM2-135M at 4 x 256 tokens, the demo model at 8 x 128.
SHAPES = (("smollm2_135m", "MLP gate/up", 1024, 576, 1536), ("smollm2_135m", "MLP down", 1024, 1536, 576),
          ("smollm2_135m", "attention q/o", 1024, 576, 576), ("smollm2_135m", "output layer", 1020, 576, 49152),
          ("demo", "MLP gate/up", 1024, 128, 384), ("demo", "MLP down", 1024, 384, 128),
          ("demo", "attention q/o", 1024, 128, 128), ("demo", "output layer", 1016, 128, 6000))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    matmul = jax.jit(jnp.matmul)
    rng = np.random.default_rng(0)
    print(f"{'model':<14}{'product':<15}{'M x K x N':>18}{'JAX ms':>9}{'torch ms':>10}{'JAX GF/s':>10}"
          f"{'torch GF/s':>12}{'torch/JAX':>11}")
    for model, what, m, k, n in SHAPES:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        t = interleaved_medians({"jax": {"mm": lambda: matmul(ja, jb).block_until_ready()},
                                 "torch": {"mm": lambda: ta @ tb}}, args.reps)
        jax_s, torch_s = t["jax"]["mm"], t["torch"]["mm"]
        gflop = 2 * m * k * n / 1e9
        print(f"{model:<14}{what:<15}{f'{m}x{k}x{n}':>18}{jax_s * 1e3:>9.3f}{torch_s * 1e3:>10.3f}"
              f"{gflop / jax_s:>10.0f}{gflop / torch_s:>12.0f}{torch_s / jax_s:>10.2f}x")


if __name__ == "__main__":
    main()
