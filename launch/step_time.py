"""The time of one training step on a Cloud TPU slice, from its ahead-of-time compile: the FLOPs per chip of the
compiled step (launch.aot.step_flops, XLA's cost analysis) over the chip's peak FLOP/s (trainer.metrics.PEAK_FLOPS)
times an assumed MFU. What a priced dry run (sweep.py, experiments.durability, launch.tpu) multiplies by the steps
and the chips to get chip-hours (launch.pricing)."""
from __future__ import annotations

import dataclasses
from typing import Any

DEFAULT_MFU = 0.4


@dataclasses.dataclass(frozen=True)
class CompiledStepTime:
    """seconds: per optimizer step at `mfu`; flops: per chip per step; formula_ratio: flops over the 6N + attention
    formula's share per chip (trainer.metrics.train_flops_per_token); fits/memory: launch.memory's verdict."""
    seconds: float
    flops: float
    chips: int
    device_kind: str
    peak: float
    mfu: float
    formula_ratio: float
    fits: bool
    memory: str

    def describe(self, topology_name: str) -> str:
        return (f"{self.flops / 1e12:.4g} TFLOP per chip per step compiled for {topology_name} ({self.chips} chips of "
                f"{self.device_kind}; {self.formula_ratio:.2f}x the 6N+attention formula) at MFU {self.mfu:g} of "
                f"{self.peak / 1e12:g} TFLOP/s; {self.memory}, {'fits' if self.fits else 'DOES NOT FIT'}")


def of_compiled(step: Any, mfu: float = DEFAULT_MFU) -> CompiledStepTime:
    """The step time of `step` (a launch.aot.CompiledStep); ValueError when it has no FLOPs (it does not fit even
    unrolled at one row per batch shard) or its chip has no known peak."""
    from launch import aot, memory
    from trainer import metrics

    run, topology_name = step.run, step.topology
    flops = aot.step_flops(step)
    kind = step.devices[0].device_kind
    hardware = metrics.hardware_of(kind)
    if flops is None or hardware is None:
        raise ValueError(f"{topology_name}: " + ("the step does not fit even unrolled at one row per batch shard"
                                                 if flops is None else f"no peak FLOP/s known for {kind}"))
    peak = metrics.PEAK_FLOPS[hardware]
    fit = aot.report(step)
    need = fit.get("peak_bytes") or fit.get("needed_bytes")
    memory_text = (f"peak {need / memory.GIB:.2f} of {fit['hbm_bytes'] / memory.GIB:.2f} GiB per chip"
                   if need and fit["hbm_bytes"] else "peak ?")
    formula = metrics.train_flops_per_token(run.model, run.train.seq_len) * run.train.batch_size * \
        run.train.seq_len / len(step.devices)
    return CompiledStepTime(flops / (peak * mfu), flops, len(step.devices), kind, peak, mfu, flops / formula,
                            fit["fits"], memory_text)
