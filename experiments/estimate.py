"""Estimated wall time of planned training runs, from the measured step time of their configs.

    estimate([Planned(name, run, steps, run_dir), ...], measure_here=True) -> Estimate

Runs of one shape (`shape_key`: the network and what else decides the cost of one step: global batch, sequence
length, mesh, microbatches, loss chunking, optimizer moment dtype) share one step time, taken from the first source
that has it:
1. "metrics": the median `step_time_s` of the metrics.jsonl records of the planned runs of that shape (finished or
   partial runs already in the experiment's folder);
2. "measured": `measure(run)` on this machine: compile + MEASURE_STEPS steps of a randomly initialised model with the
   run's real shapes, once per shape per estimate (a 30-run sweep of 3 shapes measures 3);
3. none: the estimate says why it has no step time for that shape.
A run's estimate is steps x step time: optimizer steps only; start-up, compilation, evaluation and exports are not
included (a finished run's goodput.json says how much they took: trainer.goodput). A priced estimate
(experiments.priced, `--topology`) takes every step time from one more source, a compile for a Cloud TPU topology,
and gives each run its chip-hours and cost (`Estimate.cost`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from launch.pricing import duration, usd

MEASURE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Planned:
    """A run to estimate: its name, RunConfig (trainer.config), optimizer steps and run directory (None: none yet)."""
    name: str
    run: Any
    steps: int
    run_dir: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step of one shape, where they come from ("metrics", "measured" or "compiled") and how;
    a compiled one also gives the chips it runs on and the memory fit of its step (launch.memory's report)."""
    seconds: float
    source: str
    detail: str
    chips: int | None = None
    fits: bool | None = None
    device_kind: str | None = None


@dataclasses.dataclass(frozen=True)
class Estimate:
    """shapes: shape key -> StepTime, or the reason there is none (a string); runs: run name -> (shape key, seconds
    or None); describe: shape key -> a short description of the shape; price: launch.pricing.Price of a priced
    estimate (step times "compiled")."""
    shapes: dict[str, StepTime | str]
    runs: dict[str, tuple[str, float | None]]
    describe: dict[str, str]
    price: Any = None

    @property
    def total(self) -> float:
        """Seconds of the runs that have an estimate."""
        return sum(s for _, s in self.runs.values() if s is not None)

    def cost(self, name: str) -> tuple[float, float, float | None] | None:
        """(chip-hours, on-demand USD, Spot USD or None) of run `name`; None unpriced or without an estimate."""
        key, seconds = self.runs[name]
        t = self.shapes[key]
        if self.price is None or seconds is None or not isinstance(t, StepTime) or t.chips is None:
            return None
        chip_hours = seconds * t.chips / 3600
        return (chip_hours, *self.price.cost(chip_hours))

    def total_cost(self) -> tuple[float, float, float | None]:
        costs = [c for c in map(self.cost, self.runs) if c is not None]
        spot = [c[2] for c in costs]
        return (sum(c[0] for c in costs), sum(c[1] for c in costs), None if None in spot else sum(spot))

    @property
    def missing(self) -> list[str]:
        return [name for name, (_, s) in self.runs.items() if s is None]

    def lines(self) -> list[str]:
        """The dry run's footer: the step time of each shape and its source, then the total."""
        out = ["estimated wall time: optimizer steps x the step time of the run's config shape (start-up, compilation "
               "and evaluation not included)"]
        for key, t in self.shapes.items():
            what = f"{t.seconds:.4g} s/step, {t.source}: {t.detail}" if isinstance(t, StepTime) else \
                f"no estimate: {t}"
            out.append(f"  shape {key} ({self.describe[key]}): {what}")
        total = f"total {duration(self.total)} for {len(self.runs) - len(self.missing)} runs"
        if self.price is not None:
            chip_hours, on_demand, spot = self.total_cost()
            total += f": {chip_hours:.4g} chip-hours, {usd(on_demand)} on demand, {usd(spot)} Spot"
            out.append(f"price: {self.price.describe()}")
        if self.missing:
            total += f"; {len(self.missing)} runs without an estimate"
        unfit = [key for key, t in self.shapes.items() if isinstance(t, StepTime) and t.fits is False]
        return out + [total] + [f"warning: shape {key} does not fit the chips' HBM (python -m launch.aot says what "
                                "to change)" for key in unfit]


def shape_key(run: Any) -> str:
    """A hash of what decides the cost of one step of `run` (a RunConfig); runs with equal keys share a step time."""
    t = run.train
    blob = {"model": dataclasses.asdict(run.model), "batch_size": t.batch_size, "seq_len": t.seq_len, "mesh": t.mesh,
            "microbatches": t.microbatches, "loss_chunk": t.loss_chunk, "mu_dtype": run.optimizer.mu_dtype}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _describe(run: Any) -> str:
    m, t = run.model, run.train
    return (f"{m.num_layers} layers x {m.hidden_size}, vocab {m.vocab_size}, batch {t.batch_size} x {t.seq_len} "
            "tokens")


def from_metrics(run_dirs: Sequence[pathlib.Path]) -> StepTime | None:
    """The median `step_time_s` logged in the runs' metrics.jsonl (None: no run logged one)."""
    from eval.report import read_metrics

    times, runs = [], 0
    for run_dir in run_dirs:
        logged = [r["step_time_s"] for r in read_metrics(run_dir) if isinstance(r.get("step_time_s"), (int, float))]
        times += logged
        runs += bool(logged)
    if not times:
        return None
    return StepTime(statistics.median(times), "metrics", f"median of {len(times)} logged windows of {runs} run(s) "
                                                         "in the experiment's folder")


def random_step_inputs(run: Any) -> tuple[Any, Any, Any, Any]:
    """(mesh, program, state, global batch) of `run`: a randomly initialised state and a batch of random tokens of
    the run's shape, for timing its train step (the values do not change its time)."""
    import jax
    import numpy as np

    from data import multihost
    from models import sharding
    from trainer import program as program_lib, state as state_lib

    t = run.train
    mesh = sharding.make_mesh(**t.mesh)
    program = program_lib.build(run, mesh, len(run.mixture.active_components))
    state = state_lib.init_sharded(run.model, program.tx, t.seed, mesh)
    rows = t.batch_size // jax.process_count()
    tokens = np.random.default_rng(0).integers(0, run.model.vocab_size, (rows, t.seq_len), dtype=np.int32)
    local = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), tokens.shape).copy(),
             "loss_mask": np.ones(tokens.shape, np.float32), "component": np.zeros(rows, np.int32)}
    with jax.set_mesh(mesh):
        return mesh, program, state, multihost.global_batch(local, mesh, program.batch_spec)


def measure(run: Any, steps: int = MEASURE_STEPS) -> StepTime:
    """Times `run`'s train step here: compile, then `steps` + 1 steps of a randomly initialised model on a batch of
    random tokens of the run's shape; the step time is the median of the steps after the first."""
    import jax

    t = run.train
    mesh, program, state, batch = random_step_inputs(run)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = program.train_step.lower(state, program.example_batch(t.batch_size, t.seq_len)).compile()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    devices = f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
    return StepTime(statistics.median(times[1:]), "measured",
                    f"compile {compile_s:.1f} s + {steps} steps here on {devices}")


def estimate(planned: Sequence[Planned], *, measure_here: bool = True,
             measure_fn: Callable[[Any], StepTime] | None = None,
             progress: Callable[[str], None] | None = None, price: Any = None) -> Estimate:
    """Step time per shape (metrics of the planned runs, else a measurement here unless `measure_here` is False) and
    steps x step time per run. A measurement that fails (e.g. the shape does not fit this machine) is reported as
    the shape's reason, not raised. `progress` hears a line before each measurement. A priced estimate (`price`, a
    launch.pricing.Price, with `measure_fn=compiled(...)`) takes every step time from `measure_fn`, none from
    logged metrics."""
    measure_fn = measure_fn or measure
    keys = {p.name: shape_key(p.run) for p in planned}
    shapes: dict[str, StepTime | str] = {}
    describe: dict[str, str] = {}
    for p in planned:
        key = keys[p.name]
        if key in shapes:
            continue
        describe[key] = _describe(p.run)
        dirs = [q.run_dir for q in planned if keys[q.name] == key and q.run_dir is not None and q.run_dir.is_dir()]
        found = from_metrics(dirs) if price is None else None
        if found is None and measure_here:
            if progress:
                progress(f"compiling shape {key} ({describe[key]}) for its FLOPs" if price is not None else
                         f"measuring the step time of shape {key} ({describe[key]}): compile + {MEASURE_STEPS} steps")
            try:
                found = measure_fn(p.run)
            except Exception as e:  # noqa: BLE001 - any failure to run the shape here is a reason, not a crash
                shapes[key] = f"measuring here failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
        shapes[key] = found or ("no run of this shape has logged a step time yet and measuring here is off "
                                "(--no_measure)")
    runs = {}
    for p in planned:
        t = shapes[keys[p.name]]
        runs[p.name] = (keys[p.name], p.steps * t.seconds if isinstance(t, StepTime) else None)
    return Estimate(shapes=shapes, runs=runs, describe=describe, price=price)
