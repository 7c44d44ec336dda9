"""Pre-tokenize a component of a run's mixture into ArrayRecord shards (data/pretokenize.py: the record format).

    python -m trainer.pretokenize --gin_file=t5x_configs/runs/RUN.gin [--gin.KEY=VALUE ...] \
        --component replay --output_dir gs://bucket/replay_tok [--num_files 16] [--processes 4]

It takes the same gin files and `--gin.KEY=VALUE` bindings as train.py. Read the shards back with
`Component(kind="pretokenized", paths=("DIR/*.array_record",), loss_weight=...)`.
"""
from __future__ import annotations

import argparse
import json
import sys

from data.pretokenize import pretokenize
from trainer import config


def main(argv: list[str] | None = None) -> None:
    parser = config.add_gin_flags(argparse.ArgumentParser(prog="python -m trainer.pretokenize",
                                                          description=__doc__.split("\n")[0]))
    parser.add_argument("--component", required=True, help="name of the mixture component to pretokenize")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_files", type=int, default=8, help="ArrayRecord shards to write")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    args = parser.parse_args(argv)
    run = config.load(args.gin_file, args.gin_bindings, args.gin_search_paths)
    meta = pretokenize(run.mixture, args.component, args.output_dir, num_files=args.num_files,
                       processes=args.processes)
    print(json.dumps({k: v for k, v in meta.items() if k != "bad_records"} | {"bad_records": len(meta["bad_records"])}))


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m trainer.pretokenize"))
