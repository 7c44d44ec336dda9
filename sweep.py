"""docmix sweeps: a grid of midtraining runs from one sweep file, trained, evaluated and reported in one command.

    python sweep.py sweeps/demo.toml --dry_run        # every run with its token budget, synthetic tokens, epochs/doc
                                                      # and estimated wall time (step time measured per config)
    python sweep.py sweeps/demo.toml --dry_run --topology=v5p:2x2x1 [--mfu=0.4] [--prices=FILE] [--region=R]
                                                      # priced: FLOPs of each config compiled for the slice, time at
                                                      # the MFU, chip-hours and USD on demand and Spot, memory fit
    python sweep.py sweeps/demo.toml                  # train what is not finished, evaluate, write OUT_DIR/report/
    python sweep.py sweeps/demo.toml --launcher 'python -m launch.tpu --name={name} --zone=ZONE --accelerator_type=v5p-8 -- {args}'

The sweep file (TOML, see sweeps/demo.toml and docs/eval.md) fixes the grid before anything runs: mixture shares x
seeds x corpora x document counts x model configs, the budget mode (fixed_total_tokens or fixed_synthetic_exposure)
and the evaluation. Run names are deterministic; finished runs are skipped and interrupted ones resume (train.py
resumes from MODEL_DIR). Runs execute here one after another, or each through the launcher template: `{cmd}` (a
separate word) becomes `python train.py ARGS`, `{args}` train.py's arguments alone, `{name}` and `{model_dir}` are substituted; nothing goes through a
shell. Then every finished run is evaluated (probes against the share-0 arm of the same seed, held-out loss, ANIMA
when a grader is set) and OUT_DIR/report/ gets the table, plots and report.md listing every configured run.
Exit status: 0 all runs finished, 1 some run failed or is missing (the report still lists it), 2 bad sweep file or
price table, 3 --topology without the TPU extra (libtpu).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import exit_codes

PROG = "sweep.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("sweep_file", help="sweep file (TOML)")
    parser.add_argument("--dry_run", action="store_true", help="print every run and its token budget; train nothing")
    parser.add_argument("--json", action="store_true", help="with --dry_run: print the runs as JSON")
    parser.add_argument("--launcher", help="command template to run each run through, e.g. "
                                           "'python -m launch.tpu --name={name} --zone=ZONE --accelerator_type=v5p-8 -- {args}'")
    parser.add_argument("--no_train", action="store_true", help="only evaluate finished runs and write the report")
    from experiments import priced

    priced.add_flags(parser)
    args = parser.parse_args(argv)
    priced.check_flags(parser, args)
    from launch import topology

    missing = args.topology and topology.libtpu_missing("--topology needs")
    if missing:
        return exit_codes.report(missing, PROG)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices for every evaluated checkpoint
    from experiments import plan
    from experiments.evaluate import settings
    from experiments.settings import SettingsError

    try:
        priced.price(args)  # a price table or region that does not hold, before any work
    except ValueError as e:
        return exit_codes.report(e, PROG)
    try:
        sweep = plan.load(args.sweep_file)
        eval_settings = settings(sweep.eval)
    except SettingsError as e:  # a bad sweep file: one line and exit 2, also to a caller of main()
        return exit_codes.report(e, PROG)
    if args.dry_run:
        est = priced.from_flags(plan.planned(sweep), args,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps([plan.as_dict(r, est) for r in sweep.runs]) if args.json else plan.format_plan(sweep, est))
        return 0
    from experiments import runner, sweep_report
    from experiments.evaluate import evaluate

    jobs = [runner.Job(r.name, sweep.run_dir(r), r.train_steps, tuple(plan.train_args(sweep, r))) for r in sweep.runs]
    if args.no_train:
        status = {j.name: {"status": "done" if runner.is_done(j) else "not run"} for j in jobs}
    else:
        status = runner.run_all(jobs, sweep.out_dir, launcher=args.launcher)
    results = {}
    for job in jobs:
        if status.get(job.name, {}).get("status") == "done":
            print(f"evaluating {job.name}", flush=True)
            results[job.name] = evaluate(job.model_dir, eval_settings, sweep.out_dir / "eval" / f"{job.name}.json")
    est = priced.from_flags(plan.planned(sweep), args)  # each run's estimate beside its goodput.json
    report = sweep_report.write(sweep, status, results, eval_settings, sweep.out_dir / "report", est)
    print(f"\n{report['note']}\nreport: {sweep.out_dir / 'report' / 'report.md'} "
          f"({len(report['runs'])} runs, {len(results)} evaluated)")
    if len(results) < len(jobs):
        return exit_codes.report(exit_codes.Failed(
            exit_codes.STOPPED, f"{len(jobs) - len(results)} of {len(jobs)} runs did not finish (their logs: "
            f"{sweep.out_dir / 'logs'}); rerun the same command to resume them"), PROG)
    return 0


if __name__ == "__main__":
    import host_memory

    host_memory.use_huge_pages()
    sys.exit(exit_codes.run(main, PROG))
