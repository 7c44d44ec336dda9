"""train.py's command line, for train.py and for the commands that take a train command's arguments unchanged
(`launch.aot`, `launch.tpu`): gin flags (`trainer.config.add_gin_flags`) and the several-processes flags."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from trainer import config


def train_parser(prog: str = "python train.py", description: str | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of train.py's flags: `args.gin_file`, `args.gin_bindings`, `args.gin_search_paths`,
    `args.distributed`, the cluster flags (None unless given) and `args.failure_timeout`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_gin_flags(parser)
    group = parser.add_argument_group(
        "several processes", "Run the same command on every host with --distributed. Cloud TPU VMs (and SLURM, "
        "Open MPI, Kubernetes jobs) are detected by JAX; elsewhere give all three of the flags below, e.g. on one "
        "machine: --distributed --coordinator_address=localhost:12345 --num_processes=2 --process_id=0 (then =1).")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (every process of a multi-host run)")
    group.add_argument("--coordinator_address", metavar="HOST:PORT",
                       help="address of process 0's coordinator, the same on every process (default: "
                            "$JAX_COORDINATOR_ADDRESS or the cluster's)")
    group.add_argument("--num_processes", type=int, metavar="N", help="number of processes in the run")
    group.add_argument("--process_id", type=int, metavar="I", help="this process's index, 0 <= I < N")
    group.add_argument("--failure_timeout", type=float, default=120.0, metavar="SECONDS",
                       help="when a process fails or stops answering, every process ends within this many seconds "
                            "(default 120; every process must join within it too)")
    return parser


class TrainArgsError(ValueError):
    """The arguments are not train.py's; the message names the argument."""


def parse_train_args(argv: Sequence[str]) -> argparse.Namespace:
    """train.py's arguments parsed as train.py parses them; anything train.py would refuse raises TrainArgsError
    (argparse's exit is turned into an error naming the argument)."""
    parser = train_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, config.ConfigError) as e:
        raise TrainArgsError(f"train.py arguments: {e}") from None
    if unknown:
        raise TrainArgsError(f"train.py arguments: unrecognized {' '.join(unknown)}")
    return args
