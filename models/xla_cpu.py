"""XLA CPU compile options that give Hugging Face-level float32 accuracy.

With its default YNNPACK dot fusions, XLA CPU accumulates float32 matmuls with several times the error of torch's
blocked GEMM, and over SmolLM2's 30 layers that pushes the logits away from transformers'; without the fusions they
are closer to float64 truth than transformers' own float32 forward. The same effect for a whole process: add
`XLA_FLAG` to the XLA_FLAGS environment variable before importing jax. On TPU/GPU nothing changes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax

ACCURATE_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def compiler_options() -> dict[str, str] | None:
    """`ACCURATE_DOTS` when the default backend is CPU, else None (the option does not exist elsewhere)."""
    return dict(ACCURATE_DOTS) if jax.default_backend() == "cpu" else None


def jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options()` (decided on first call, not at import)."""
    compiled: dict[str, Callable] = {}

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        if "fn" not in compiled:
            compiled["fn"] = jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
        return compiled["fn"](*args, **kwargs)

    return wrapper
