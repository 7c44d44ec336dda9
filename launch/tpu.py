"""Run train.py on a Cloud TPU slice and see it through: check it fits, create the VM, set it up, start the job
detached on every worker, follow it, relaunch after preemption, delete the VM at the end.

    python -m launch.tpu --name=docmix-8b --zone=us-east5-a --accelerator_type=v5p-8 --spot [--queued] \
        [--num_slices=2] [--runtime_version=...] [--project=P] [--dry_run [--price]] [--mfu=0.4] [--prices=FILE] \
        [--rehearse=N] -- TRAIN.PY ARGUMENTS

Before anything is created, the train command is compiled for the slice's topology (`launch.aot`, libtpu needed;
`--skip_aot_check` skips it) and refused when it does not fit with 10% of HBM free; the same compile estimates the run's
time (TRAIN_STEPS x the step's FLOPs per chip over the chips' peak at `--mfu`) and its cost in chip-hours and USD at the
zone's region's price (launch.pricing; `--prices FILE`), printed before anything is created: `--dry_run --price` prints
them and creates nothing. MODEL_DIR and INIT_FROM must be on gs:// (a new VM has neither the old VM's disk nor yours).
Then, per attempt: create the slice (or reuse a READY one), set up every worker (Python 3.11, a venv, requirements-
tpu.txt and requirements-gcs.txt), copy the code (the repository's tracked files), and start `launch.job` (which runs
`train.py --distributed ARGS`) detached on every worker. The launcher then follows the job through what it writes under
MODEL_DIR/launch/ (state, heartbeat, step, logs: streamed here) and the VMs' state, over no long-lived connection. A
dropped SSH connection (exit 255, VM still READY) is retried; a node that is not READY (preempted) in any phase, a job
stopped by SIGTERM, or a job whose heartbeat stops is relaunched (the run resumes from MODEL_DIR), up to
`--max_relaunches` times. A VM is deleted at the end only when its jobs have ended (or were never started); rerunning
the same command while a job still runs reattaches to it. Exit status: train.py's (0 done, 1 stopped on the numbers or
data, 2 configuration), 2 for a bad command line or a run that does not fit, 3 for the cloud (gcloud missing or failing,
relaunches used up), 130 interrupted (the job keeps running). `--rehearse=N` runs all of it on this machine
(launch.rehearsal).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence

import exit_codes
from launch import cloud, pricing, remote, step_time
from launch.cloud import Gcloud, Slice
from launch.launcher import Launcher, Options


def run_paths(train_args: Sequence[str]) -> tuple[str, str | None]:
    """MODEL_DIR and INIT_FROM of a train command, read from its gin config as train.py parses it (neither is read).
    A TPU VM reads both from gs://: a new VM has neither your disk nor the old VM's."""
    from trainer import cli, config

    args = cli.parse_train_args(train_args)
    config.parse(args.gin_file, args.gin_bindings, args.gin_search_paths)
    model_dir, init_from = config.bound("TrainConfig.model_dir"), config.bound("TrainConfig.init_from")
    if not str(model_dir or "").startswith("gs://"):
        raise ValueError(f"MODEL_DIR={model_dir}: must be on gs:// (a relaunched VM resumes from it; a local "
                         "MODEL_DIR would be lost with the VM)")
    if init_from and not str(init_from).startswith("gs://"):
        raise ValueError(f"INIT_FROM={init_from}: must be on gs:// (a new TPU VM does not have this path; copy the "
                         "folder to your bucket: gcloud storage cp -r DIR gs://BUCKET/models/)")
    return model_dir, init_from


def vm_name(name: str) -> str:
    """A valid TPU VM name for `name` (a sweep's run name, say): a lower-case letter first, then letters, digits
    and `-`, at most 61 characters (a multi-slice node adds `-<i>`)."""
    out = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = out if out[:1].isalpha() else f"t-{out}".rstrip("-")
    return out[:61].rstrip("-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator_type", required=True, help="e.g. v5p-8, v6e-8, v5litepod-16")
    p.add_argument("--runtime_version", help="TPU software version (default: by accelerator family)")
    p.add_argument("--topology", help="the slice's topology for the fit check (default: the accelerator type's)")
    p.add_argument("--project")
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (cheaper; can be preempted)")
    capacity.add_argument("--reserved", action="store_true", help="use a reservation")
    p.add_argument("--queued", action="store_true", help="create through a queued resource (waits for capacity)")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (a queued resource)")
    p.add_argument("--max_relaunches", type=int, default=Options.max_relaunches)
    p.add_argument("--poll_s", type=float, default=Options.poll_s, help="seconds between looks at the job and VMs")
    p.add_argument("--heartbeat_s", type=float, default=Options.heartbeat_s, help="the job's state and log writes")
    p.add_argument("--stale_s", type=float, default=Options.stale_s, help="a job silent this long is relaunched")
    p.add_argument("--keep", action="store_true", help="do not delete the VM at the end")
    p.add_argument("--skip_aot_check", action="store_true", help="launch without compiling for the topology first")
    p.add_argument("--dry_run", action="store_true", help="print what would run; create and run nothing")
    p.add_argument("--price", action="store_true", help="with --dry_run: also compile the step here (the TPU extra), "
                   "check its fit and price the run (a launch always does)")
    p.add_argument("--mfu", type=float, default=step_time.DEFAULT_MFU,
                   help=f"the share of the chips' peak FLOP/s the run's time is estimated at (default "
                        f"{step_time.DEFAULT_MFU})")
    p.add_argument("--prices", help="a price table (TOML, as launch/prices.toml) replacing the shipped prices "
                   "region by region; the zone's region is priced")
    p.add_argument("--rehearse", type=int, metavar="N", help="rehearse the whole launch here with N workers, a "
                   "local GCS emulator, a small model, an SSH drop and a preemption (launch.rehearsal)")
    return p


def slice_of(args: argparse.Namespace) -> Slice:
    name = vm_name(args.name)
    if name != args.name:
        print(f"launch.tpu: --name={args.name}: the TPU VM is named {name} (lower case letters, digits and -)")
    runtime = args.runtime_version or cloud.default_runtime(args.accelerator_type)
    return Slice(name, args.zone, args.accelerator_type, runtime, args.project, args.spot, args.reserved,
                 args.queued, args.num_slices)


def main(argv: Sequence[str] | None = None) -> int:
    from launch import topology

    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = parser()
    args = p.parse_args(ours)
    if args.price and not args.dry_run:
        p.error("--price is for --dry_run (a launch always checks the fit and prices the run)")
    if args.price and args.skip_aot_check:
        p.error("--price compiles the step: leave out --skip_aot_check")
    if not 0 < args.mfu <= 1:
        p.error(f"--mfu={args.mfu:g}: give a share of the peak in (0, 1]")
    s = slice_of(args)
    if args.rehearse is not None:
        from launch import rehearsal

        return rehearsal.run(s, args.rehearse, args.max_relaunches, train_args)
    model_dir, _ = run_paths(train_args)
    topo = None if args.skip_aot_check else args.topology or topology.topology_of(args.accelerator_type)
    options = Options(max_relaunches=args.max_relaunches, poll_s=args.poll_s, heartbeat_s=args.heartbeat_s,
                      stale_s=args.stale_s, keep=args.keep)
    check = topo is not None and (args.price or not args.dry_run)
    if check and (missing := topology.libtpu_missing()):
        raise missing
    cost = Cost(args.mfu, args.prices) if check else None
    return launch(s, Gcloud(dry_run=args.dry_run), model_dir, train_args, options, topo, cost=cost)


class Cost:
    """What the fit check also estimates: the run's TRAIN_STEPS at `mfu` (launch.step_time) on the slice's chips, in
    chip-hours and USD at the price of the zone's region (launch.pricing; `prices`: a user's table)."""

    def __init__(self, mfu: float = step_time.DEFAULT_MFU, prices: str | None = None):
        self.mfu, self.prices = mfu, prices

    def line(self, step, s: Slice) -> str:
        t = step_time.of_compiled(step, self.mfu)
        steps = step.run.train.train_steps
        seconds = steps * t.seconds
        chip_hours = seconds * t.chips / 3600
        text = (f"launch.tpu: estimated {steps:,} steps x {t.seconds:.4g} s = {pricing.duration(seconds)} "
                f"({t.describe(step.topology)}): {chip_hours:.4g} chip-hours")
        try:
            price = pricing.lookup(step.topology, s.zone.rsplit("-", 1)[0], self.prices)
        except ValueError as e:
            return f"{text}; not priced: {e}"
        on_demand, spot = price.cost(chip_hours)
        return f"{text}, {pricing.usd(on_demand)} on demand, {pricing.usd(spot)} Spot (price: {price.describe()})"


def launch(s: Slice, gcloud: Gcloud, model_dir: str, train_args: Sequence[str], options: Options,
           aot_topology: str | None, out: Callable[[str], None] = print, cost: Cost | None = None) -> int:
    """Checks the fit on `aot_topology` (None: no check) and prints what the run costs, then runs the Launcher; the
    exit status. A dry run checks and prices only when given a `cost`."""
    from launch import aot, memory

    if aot_topology is not None:
        check = ["python", "-m", "launch.aot", f"--topology={aot_topology}", f"--num_slices={s.num_slices}", "--",
                 *train_args]
        if gcloud.dry_run and cost is None:
            out("(dry run, not run) " + shlex.join(check))
        else:
            out(f"launch.tpu: checking that the step fits {aot_topology} (launch.aot; minutes for a large model)")
            step = aot.compile_step(aot.load_train_args(train_args), aot_topology, num_slices=s.num_slices)
            report = aot.report(step)
            out(memory.format_report(report))
            if not report["fits"]:
                raise ValueError(f"the run does not fit {aot_topology} with {memory.HBM_FREE:.0%} of HBM free; "
                                 f"nothing was created. Try: {report['suggestion']}")
            out((cost or Cost()).line(step, s))
    with tempfile.TemporaryDirectory() as tmp:
        archive = remote.code_archive(pathlib.Path(tmp) / remote.ARCHIVE)
        return Launcher(s, gcloud, model_dir, train_args, archive, options, out).run()


if __name__ == "__main__":
    sys.exit(exit_codes.run(main, "python -m launch.tpu"))
