"""docmix training: midtraining and SFT from T5X-style gin configs.

    python train.py                                   # the demo: a small model on KJV + 10% synthetic welfare docs
    python train.py --gin_file=runs/midtrain.gin --gin.MODEL_DIR=gs://bucket/run --gin.INIT_FROM=/path/hf_folder
    python train.py --gin_file=runs/demo.gin --gin.MIXTURE_WEIGHTS="{'replay': 0.95, 'synthetic': 0.05}"

Rerunning the same command resumes from the latest checkpoint in MODEL_DIR. Exit status (the table in exit_codes.py
and the README): 0 done or preempted (SIGTERM saves a checkpoint first), 1 stopped on a non-finite loss or exhausted
data, 2 configuration, input or resume-mismatch error, another run holding MODEL_DIR (at start, or taking over this
run's lock mid-run: this run stops, writing nothing more), or an export folder that is not an earlier export, 3 another
process of a multi-host run stopped answering, 4 internal error. In a multi-host run a process that stops because
another failed exits with that process's code.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shlex
import sys
import time

STARTED = time.perf_counter()  # the goodput clock's start (trainer.goodput): imports and start-up count
log = logging.getLogger("docmix.train")


def main(argv: list[str] | None = None) -> int:
    from trainer import cli, config

    parser = cli.train_parser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    args = parser.parse_args(argv)
    cluster = {"coordinator_address": args.coordinator_address, "num_processes": args.num_processes,
               "process_id": args.process_id}
    given = {k: v for k, v in cluster.items() if v is not None}
    if given and not args.distributed:
        parser.error(f"--{', --'.join(given)}: only with --distributed")
    if args.failure_timeout < 4:
        parser.error(f"--failure_timeout={args.failure_timeout:g}: give at least 4 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import exit_codes
    from trainer import pod

    try:
        return train(args, given, argv)
    except Exception as e:
        pod.settle(e)  # a collective that failed because another process is gone: the watch names that one
        pod.report_failure(e)  # the other processes name this error (a no-op in a run of one process)
        return exit_codes.report(e, "train.py")  # one line and the code from the table (a traceback for a bug)


def train(args: argparse.Namespace, cluster: dict, argv: list[str] | None) -> int:
    """Joins the other processes (--distributed), loads and checks the configuration (agreed between processes),
    trains, and prints the summary."""
    from trainer import config

    processes = 1
    if args.distributed:
        processes = join(cluster, args.failure_timeout)
    run, error, probe_scorer = None, None, None
    try:
        run = config.load(args.gin_file, args.gin_bindings, args.gin_search_paths)
        run.mixture.check_run(processes)  # a share the run's rows cannot hold, before MODEL_DIR is touched
        check_model_dir(run.model_dir)
        if run.train.probe_sets:  # read now, scored in the loop by eval's scorer (trainer/ does not import eval/)
            from eval import live_probes

            probe_scorer = live_probes.read_sets(run.train).scorer
    except (config.ConfigError, OSError, ValueError) as e:
        error = e
    import jax

    if jax.process_count() > 1:  # every process stops on any process's error, or on a difference between them
        from trainer import pod_start, run_metadata

        flags = {"failure_timeout": args.failure_timeout}
        pod_start.same_config(run and pod_start.operative(run.gin_text, flags, run_metadata.code_version()), error)
        pod_start.shared_model_dir(run.model_dir)
    elif error is not None:
        raise error
    from trainer import goodput, loop

    summary = loop.train(run, probe_scorer=probe_scorer, clock=goodput.Clock(STARTED))
    if jax.process_index() == 0:
        print(format_summary(summary, argv if argv is not None else sys.argv[1:]))
        if summary.step > run.train_steps:
            log.warning("nothing was trained: %s is at step %d, beyond TRAIN_STEPS=%d; to continue, raise "
                        "--gin.TRAIN_STEPS", summary.model_dir, summary.step, run.train_steps)
    return 0


def join(cluster: dict, failure_timeout: float) -> int:
    """jax.distributed.initialize and this process's watch over the others (trainer.pod.join); returns the number
    of processes."""
    import jax

    from trainer import pod

    try:
        pod.join("train.py", failure_timeout, cluster)
    except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: JAX was used before, or initialized twice
        raise ValueError(f"--distributed: jax.distributed.initialize({cluster}) failed: {e}") from None
    return jax.process_count()


def check_model_dir(model_dir: str) -> None:
    """MODEL_DIR must not exist yet, or be a docmix run directory (trainer.run_dir), or be empty; a local one must be
    a directory this user can write. Raised before any work."""
    import storage
    from trainer import run_dir

    if not storage.is_remote(model_dir):  # remote storage: its filesystem layer reports access errors
        path = pathlib.Path(model_dir).absolute()
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"MODEL_DIR={model_dir} is a file, not a directory")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"MODEL_DIR={model_dir}: {existing} is not a writable directory")
    run_dir.check(model_dir)


def shell_word(arg: str) -> str:
    """`arg` quoted for bash, readably: --gin.X="{'a': 1}" rather than shlex's '--gin.X={'"'"'a'"'"': 1}'."""
    key, sep, value = arg.partition("=")
    if shlex.quote(arg) != arg and sep and shlex.quote(key) == key and not set(value) & set('"\\$`!'):
        return f'{key}="{value}"'
    return shlex.quote(arg)


def shell_line(args: list[str]) -> str:
    return " ".join(map(shell_word, args))


def format_summary(s, argv: list[str]) -> str:
    """The end-of-run report: losses, throughput, where things are, what to run next."""
    from trainer import config

    gin, _ = config.add_gin_flags(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    again = shell_line(["python", "train.py", *argv])  # quoted: pasting it into bash runs it as given
    # A longer run changes the learning-rate schedule: continue as a new schedule phase (docs/training.md).
    replaced = ("--gin.TRAIN_STEPS=", "--gin.OptimizerConfig.schedule_start=")
    longer = shell_line(["python", "train.py", *[a for a in argv if not a.startswith(replaced)],
                         f"--gin.TRAIN_STEPS={s.step * 2}", f"--gin.OptimizerConfig.schedule_start={s.step}"])
    lines = [f"\n== docmix run {s.model_dir} stopped at step {s.step} ({s.stopped}) =="]
    if s.loss is not None:
        parts = ", ".join(f"{n} {v:.3f}" for n, v in s.component_loss.items() if v is not None)
        lines.append(f"final loss {s.loss:.4f} (per component over the last log window: {parts})")
    if s.eval_loss:
        lines.append("held-out loss: " + ", ".join(f"{n} {v:.3f} ({s.eval_tokens[n]:,} tokens)"
                                                  for n, v in s.eval_loss.items())
                     + f"; python -m eval.heldout --model {s.model_dir} gives the same numbers")
    lines.append(f"throughput {s.tokens_per_s:,.0f} tokens/s, MFU {s.mfu:.1%} of {s.peak_source}")
    if s.goodput is not None:
        from trainer import goodput

        lines.append(f"{goodput.summary_line(s.goodput)} ({s.model_dir / goodput.FILE})")
    lines.append(f"metrics      {s.model_dir / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {s.model_dir / 'tb'})")
    if s.checkpoint is not None:
        lines.append(f"checkpoint   {s.checkpoint}")
    if s.export is not None:
        lines.append(f"HF export    {s.export}")
    model = s.export or s.model_dir
    lines += ["next:",
              f"  {again}    # resume / continue (rerun the same command)" if s.stopped != "done" else
              f"  {longer}    # train longer, resuming from step {s.step}",
              "  " + shell_line(["python", "-m", "eval.generate", "--model", str(model),
                                 "--prompt", "The committee reviewed the farm report and"]),
              "  " + shell_line(["python", "-m", "eval.heldout", "--model", str(s.model_dir)]),
              "  " + shell_line(["python", "-m", "trainer.preview", *config_args(gin), "--num_batches", "4"])
              + "    # look at the training data"]
    if not gin.gin_file:  # the embedded demo (no gin file given): its share is one binding
        lines.append("  " + shell_line(["python", "train.py", "--gin.MODEL_DIR=./runs/demo_5pct",
                                        "--gin.MIXTURE_WEIGHTS={'replay': 0.95, 'synthetic': 0.05}"])
                     + "    # another synthetic share")
    return "\n".join(lines)


def config_args(gin: argparse.Namespace) -> list[str]:
    """The run's gin search paths, files and bindings (parsed from train.py's argv) as the entry points that read a
    run's config (trainer.preview) take them."""
    paths = [f"--gin_search_paths={','.join(gin.gin_search_paths)}"] if gin.gin_search_paths else []
    return paths + [f"--gin_file={f}" for f in gin.gin_file] + [f"--gin_bindings={b}" for b in gin.gin_bindings]


if __name__ == "__main__":
    import host_memory

    host_memory.use_huge_pages()
    from trainer import preemption

    preemption.install()  # before JAX is imported: SIGTERM from here on stops the run at its next step (exit 0)
    import exit_codes
    from trainer import pod

    pod.leave(exit_codes.run(main, "train.py"))  # in a run of several processes, the others learn how this one ended
