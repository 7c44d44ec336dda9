"""What a compiled train step needs per chip, against the chip's HBM, and what to change when it does not fit.

The numbers and how they relate (`compiled.memory_analysis()`, per chip):
- `arguments`: the step's inputs resident on the chip: the train state's shards and the batch rows.
- `peak`: the compiler's peak, the most bytes live at any point of the step as its buffer assignment simulates
  it, arguments included. This is what has to fit: the compiler refuses a program that needs more than the HBM it
  has (`topology.HBM_GIB`) and compiles one whose peak is below it.
- `live at the peak` = peak - arguments: the temporaries (activations, gradients, optimizer updates, collective
  buffers) and new outputs live at that moment.
- The compiler's `temp_size_in_bytes` is not printed: it sums temporary buffers that are never live at once (it
  can exceed the peak, and even the chip's HBM, for a program that fits). The JSON report keeps it as
  `temp_allocation_bytes`, and every other raw field under its own name.
- `free` = HBM - peak. A run needs `HBM_FREE` of the HBM free (see below), so "fits" means free >= HBM_FREE * HBM.

Why 10% free (`HBM_FREE`): the compiler's HBM figure is what the runtime leaves to programs, and the train step is not
all that runs. Kept beside it: the next batch, copied to the chips while a step runs; the held-out evaluation step
(another program, run with the train state resident); the generated code; checkpoint and metrics transfers; the
runtime's own allocations at run time and fragmentation. None of these is in the step's peak; 10% of HBM (3.1 GiB
on a 31.25 GiB v6e chip) covers them with room to spare for the shipped configs (BENCHMARKS.md).
"""
from __future__ import annotations

import math
from typing import Any

from launch.topology import GIB

HBM_FREE = 0.10


def per_chip_bytes(abstract: Any, shardings: Any) -> tuple[int, int, int]:
    """(total bytes, bytes per chip, bytes of replicated arrays) of abstract state under its sharding prefix tree."""
    import jax

    sizes = []  # (total, per chip, replicated) of each array
    def add(sharding, subtree):
        for x in jax.tree.leaves(subtree):
            total = math.prod(x.shape) * x.dtype.itemsize
            chip = math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
            sizes.append((total, chip, total if sharding.is_fully_replicated else 0))
    jax.tree.map(add, shardings, abstract)
    return tuple(sum(col) for col in zip(*sizes))


def from_analysis(mem: Any, hbm: int | None, free_fraction: float = HBM_FREE) -> dict[str, Any]:
    """The report's memory fields from `compiled.memory_analysis()` (see the module docstring)."""
    peak = int(mem.peak_memory_in_bytes)
    arguments = int(mem.argument_size_in_bytes)
    out = {"peak_bytes": peak, "argument_bytes": arguments, "live_at_peak_bytes": peak - arguments,
           "temp_allocation_bytes": int(mem.temp_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes), "generated_code_bytes": int(mem.generated_code_size_in_bytes),
           "hbm_free_required": free_fraction}
    if hbm is not None:
        out.update(free_bytes=hbm - peak, free_fraction=round((hbm - peak) / hbm, 4),
                   fits=hbm - peak >= free_fraction * hbm)
    else:
        out.update(free_bytes=None, free_fraction=None, fits=True)  # a device kind without a known HBM figure
    return out


def suggestion(run: Any, mesh: dict[str, int], chips: int) -> str:
    """What to try when a step does not fit, most effective first."""
    t, m = run.train, run.model
    tips = []
    if t.loss_chunk is None and m.vocab_size >= 32768:
        tips.append(f"--gin.TrainConfig.loss_chunk={min(512, t.seq_len)} (blocks of logits instead of all "
                    f"[rows, {t.seq_len}, {m.vocab_size}] float32 logits)")
    if m.remat != "full":
        tips.append("--gin.ModelConfig.remat='full'")
    rows = t.batch_size // max(mesh.get("data", 1) * mesh.get("fsdp", 1), 1)
    more = [k for k in range(t.microbatches + 1, t.batch_size + 1) if t.batch_size % k == 0 and rows % k == 0]
    if more:
        tips.append(f"--gin.TrainConfig.microbatches={more[0]} (accumulate gradients; same global batch)")
    if mesh.get("tensor", 1) == 1:
        tips.append("--mesh data=1,fsdp=-1,tensor=2 (tensor parallelism splits the vocabulary and MLP too)")
    tips.append(f"a topology with more than {chips} chips")
    return "; or ".join(tips)


def _gib(b: int | None) -> str:
    return "?" if b is None else f"{b / GIB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
    lines = [f"{r['topology']}{slices}: {r['chips']} chips of {r['device_kind']} "
             f"(HBM for programs {_gib(r['hbm_bytes'])} each), mesh {mesh}",
             f"batch {r['batch_size']} x {r['seq_len']}, microbatches {r['microbatches']}, loss_chunk "
             f"{r['loss_chunk']}, remat {r['remat']}, attention {r['attention']}, params {r['param_dtype']}, "
             f"compute {r['compute_dtype']}",
             f"train state {_gib(r['state_bytes'])} = {_gib(r['state_bytes_per_chip'])} per chip",
             f"compiled in {r['compile_seconds']} s"]
    if "peak_bytes" in r:
        lines.append(f"per chip: peak {_gib(r['peak_bytes'])} = arguments {_gib(r['argument_bytes'])} (train state "
                     f"and batch) + {_gib(r['live_at_peak_bytes'])} live at the peak (temporaries and outputs)")
        if r["hbm_bytes"] is not None:
            lines.append(f"free: {_gib(r['free_bytes'])} of {_gib(r['hbm_bytes'])} ({r['free_fraction']:.1%}); "
                         f"a run needs {r['hbm_free_required']:.0%} free")
        lines.append("collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v))
    else:
        lines.append(f"out of memory: {r['error']}")
    lines.append("FITS" if r["fits"] else f"DOES NOT FIT. Try: {r['suggestion']}")
    return "\n".join(lines)


def table_row(model: str, r: dict[str, Any]) -> str:
    need = r.get("peak_bytes") or r.get("needed_bytes")
    peak = "?" if need is None else f"{need / GIB:.1f}"
    free = "-" if r.get("free_fraction") is None else f"{r['free_fraction']:.0%}"
    mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    chunk = r["loss_chunk"] or "-"
    return (f"| {model} | {r['topology']} | {mesh} | {r['batch_size']}x{r['seq_len']} | {r['microbatches']} | "
            f"{chunk} | {r['param_dtype']}/{r['compute_dtype']} | {peak} | {r['hbm_bytes'] / GIB:.2f} | {free} | "
            f"{'yes' if r['fits'] else 'no'} | {r['compile_seconds']} |")
