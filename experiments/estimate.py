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
included (a finished run's goodput.json says how much they took: trainer.goodput).

Priced (`--topology`, `compiled`): the step time of each shape on a Cloud TPU topology instead, from no logged time:
the FLOPs per chip of the run's train step compiled for that topology (launch.aot.step_flops: XLA's cost analysis)
over the chip's peak (trainer.metrics.PEAK_FLOPS) x the assumed MFU; each run then costs steps x step time x chips
in chip-hours, at the price table's on-demand and Spot prices (launch.pricing). The compile also tells whether the
shape fits the chips' HBM (launch.memory).
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

MEASURE_STEPS = 3
DEFAULT_MFU = 0.4


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


def against_actual(est: Estimate | None, name: str, run_dir: Any) -> dict[str, Any]:
    """A run's estimated time (and cost, when priced) beside the actual ones of its run directory's goodput.json
    (trainer.goodput: every attempt's wall time; cost = each attempt's wall time x its devices at the price, when
    they are the priced chips); {} when neither is known."""
    from trainer import goodput

    row: dict[str, Any] = {}
    if est is not None and est.runs.get(name, (None, None))[1] is not None:
        row["est_time_s"] = est.runs[name][1]
        cost = est.cost(name)
        if cost is not None:
            row["est_cost_usd"] = cost[1]
    attempts = goodput.read(run_dir) if run_dir is not None else []
    if attempts:
        total = goodput.totals(attempts)
        row |= {"actual_time_s": total["wall_s"], "goodput": total["goodput"]}
        t = est.shapes.get(est.runs[name][0]) if est is not None and name in est.runs else None
        if isinstance(t, StepTime) and t.device_kind and all(a["device_kind"] == t.device_kind for a in attempts):
            row["actual_cost_usd"] = est.price.on_demand * sum(a["wall_s"] * a["devices"] for a in attempts) / 3600
    return row


TIME_HEADER = "time: estimated / actual (goodput); cost: estimated / actual"


def time_cell(row: dict[str, Any]) -> str:
    """A report's time (and cost) cell of a row with `against_actual`'s keys: `2.1min / 3.0min (61%); $1.20 / $1.71`."""
    actual = duration(row["actual_time_s"]) + f" ({row['goodput']:.0%})" if "actual_time_s" in row else "-"
    cell = f"{duration(row.get('est_time_s'))} / {actual}"
    if "est_cost_usd" in row:
        cell += f"; {usd(row['est_cost_usd'])} / {usd(row.get('actual_cost_usd'))}"
    return cell


def cost_header(est: Estimate | None) -> str:
    """The dry-run table's cost columns (after est_time): empty unless the estimate is priced."""
    return "" if est is None or est.price is None else f" {'chip_h':>9} {'on_demand':>10} {'spot':>10}"


def cost_columns(est: Estimate | None, name: str) -> str:
    if est is None or est.price is None:
        return ""
    chip_hours, on_demand, spot = est.cost(name) or (None, None, None)
    return f" {'-' if chip_hours is None else f'{chip_hours:.4g}':>9} {usd(on_demand):>10} {usd(spot):>10}"


def add_flags(parser: Any) -> None:
    """The dry run's estimate flags (sweep.py, experiments.durability)."""
    parser.add_argument("--no_measure", action="store_true",
                        help="with --dry_run: estimate wall time only from step times that runs in OUT_DIR logged; "
                             "do not time the configs on this machine")
    parser.add_argument("--topology", help="price every run on this Cloud TPU topology (e.g. v5p:2x2x1): each "
                        "distinct config compiled for it (the TPU extra), FLOPs at --mfu; in the dry run's table, "
                        "and beside each run's actual time and cost in the report")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"with --topology: the share of the chips' peak FLOP/s assumed (default {DEFAULT_MFU})")
    parser.add_argument("--prices", help="with --topology: a price table (TOML, as launch/prices.toml) replacing the "
                        "shipped prices region by region")
    parser.add_argument("--region", help="with --topology: the region priced (default: the table's first for the "
                        "TPU family)")


def check_flags(parser: Any, args: Any) -> None:
    """Usage errors of the estimate flags (argparse's exit 2)."""
    if (args.prices or args.region) and not args.topology:
        parser.error("--prices and --region need --topology")
    if args.topology and args.no_measure:
        parser.error("--topology takes every step time from a compile: leave out --no_measure")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu={args.mfu:g}: give a share of the peak in (0, 1]")


def price(args: Any) -> Any:
    """The launch.pricing.Price the flags ask for (None without --topology); ValueError for a price table or region
    that does not hold."""
    from launch import pricing

    return pricing.lookup(args.topology, args.region, args.prices) if args.topology else None


def from_flags(planned: Sequence[Planned], args: Any, progress: Callable[[str], None] | None = None) -> Estimate:
    """The estimate as the flags ask: priced on --topology, else measured here (or only logged times; after the runs,
    for the report, always only those)."""
    if not args.topology:
        return estimate(planned, measure_here=args.dry_run and not args.no_measure, progress=progress)
    return estimate(planned, measure_fn=compiled(args.topology, args.mfu), progress=progress, price=price(args))


def usd(amount: float | None) -> str:
    """'-', '$0.0123', '$12.35' or '$1,235' (one word, for tables)."""
    if amount is None:
        return "-"
    return f"${amount:.3g}" if amount < 1 else (f"${amount:,.2f}" if amount < 1000 else f"${amount:,.0f}")


def duration(seconds: float | None) -> str:
    """'-', '42s', '3.5min' or '2.1h' (one word, for tables)."""
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f}min" if seconds < 5400 else f"{seconds / 3600:.1f}h"


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


def compiled(topology_name: str, mfu: float = DEFAULT_MFU) -> Callable[[Any], StepTime]:
    """A `measure_fn` for `estimate`: the run's train step compiled for `topology_name` (launch.aot), its FLOPs per
    chip (launch.aot.step_flops) at `mfu` of the chip's peak."""
    def step_time(run: Any) -> StepTime:
        from launch import aot, memory
        from trainer import metrics

        step = aot.compile_step(run, topology_name)
        flops = aot.step_flops(step)
        kind = step.devices[0].device_kind
        hardware = metrics.hardware_of(kind)
        if flops is None or hardware is None:
            raise ValueError(f"{topology_name}: {'no compile of the step fits' if flops is None else 'no peak FLOP/s'}"
                             f" ({kind})")
        peak = metrics.PEAK_FLOPS[hardware]
        fit = aot.report(step)
        need = fit.get("peak_bytes") or fit.get("needed_bytes")
        memory_text = (f"peak {need / memory.GIB:.2f} of {fit['hbm_bytes'] / memory.GIB:.2f} GiB per chip"
                       if need and fit["hbm_bytes"] else "peak ?")
        model = metrics.train_flops_per_token(run.model, run.train.seq_len) * run.train.batch_size * \
            run.train.seq_len / len(step.devices)
        return StepTime(flops / (peak * mfu), "compiled",
                        f"{flops / 1e12:.4g} TFLOP per chip per step compiled for {topology_name} ({len(step.devices)} "
                        f"chips of {kind}; {flops / model:.2f}x the 6N+attention formula) at MFU {mfu:g} of "
                        f"{peak / 1e12:g} TFLOP/s; {memory_text}, {'fits' if fit['fits'] else 'DOES NOT FIT'}",
                        chips=len(step.devices), fits=fit["fits"], device_kind=kind)
    return step_time


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
