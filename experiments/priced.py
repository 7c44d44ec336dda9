"""Priced estimates, and estimates beside what runs took: the step time of a config compiled for a Cloud TPU
topology (FLOPs per chip at an assumed MFU), the flags sweep.py and experiments.durability share for it, the dry-run
table's cost columns, and the reports' estimated vs actual time and cost (goodput.json).

A priced run costs steps x step time x chips in chip-hours at the price table's on-demand and Spot prices
(launch.pricing); the step time is that of the run's train step compiled for the topology (launch.step_time: its
FLOPs per chip over the chip's peak x the MFU). The compile also tells whether the config fits the chips' HBM.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from experiments.estimate import Estimate, Planned, StepTime, duration, estimate, usd
from launch.step_time import DEFAULT_MFU


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


def arm_lines(est: Estimate | None, arms: dict[str, list[str]]) -> list[str]:
    """Per arm ({arm: its run names}), the chip-hours and cost of its runs: lines under a priced dry run's table."""
    if est is None or est.price is None:
        return []
    lines = []
    for arm, names in arms.items():
        costs = [c for c in map(est.cost, names) if c is not None]
        spot = None if any(c[2] is None for c in costs) else sum(c[2] for c in costs)
        lines.append(f"arm {arm} ({len(names)} runs): {sum(c[0] for c in costs):.4g} chip-hours, "
                     f"{usd(sum(c[1] for c in costs))} on demand, {usd(spot)} Spot")
    return lines


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


def compiled(topology_name: str, mfu: float = DEFAULT_MFU) -> Callable[[Any], StepTime]:
    """A `measure_fn` for `estimate`: the run's train step compiled for `topology_name`, timed by launch.step_time."""
    def step_time(run: Any) -> StepTime:
        from launch import aot, step_time as compiled_time

        t = compiled_time.of_compiled(aot.compile_step(run, topology_name), mfu)
        return StepTime(t.seconds, "compiled", t.describe(topology_name), chips=t.chips, fits=t.fits,
                        device_kind=t.device_kind)
    return step_time
