"""Preview a mixture: realized shares over the first N batches, and a few decoded rows per component.

    python -m trainer.preview --gin_file=RUN.gin [--gin.KEY=VALUE ...] [--num_batches N] [--json]

Examples:
    python -m trainer.preview --num_batches 4                                # the demo run's mixture
    python -m trainer.preview --gin_file=runs/demo.gin --gin.MIXTURE_WEIGHTS="{'replay': 0.95, 'synthetic': 0.05}"
    python -m trainer.preview --gin_file=runs/midtrain.gin --gin.INIT_FROM=/models/llama \
        --gin.SYNTHETIC_FILES="('welfare.jsonl',)" --gin.REPLAY_FILES="('replay/*.jsonl.gz',)"

It takes the same gin files and `--gin.KEY=VALUE` bindings as train.py (MODEL_DIR is not needed; INIT_FROM is, for
run files whose tokenizer is INIT_FROM's). Configuration errors exit 2 with one line naming the binding.

With --json it prints one object:
{"components": {NAME: {"weight", "token_share", "rows", "tokens", "documents", "epochs"}}, "padding_fraction", "rows",
 "stages": [{"start", "end", "weights": {NAME: w}, "components": {NAME: {"token_share", "rows", "tokens"}}}, ...]}
where tokens and token shares count non-padding tokens, "weight" is the first stage's, and "stages" has one entry per
stage of the mixture schedule (MIXTURE_WEIGHTS as a list of (start step, weights)) that the batches read reach, over
steps [start, end). Without it, a table (and one per stage for a schedule) and decoded sample rows, in which text
that is not a loss target is shown in [[double brackets]].
"""
from __future__ import annotations

import argparse
import json
import sys

from data.preview import format_table, preview
from trainer import config

# A preview reads data only: runs that leave MODEL_DIR unset still load (a later --gin.MODEL_DIR wins).
UNUSED_MODEL_DIR = "MODEL_DIR = '(not used by trainer.preview)'"


def main(argv: list[str] | None = None) -> int:
    parser = config.add_gin_flags(argparse.ArgumentParser(
        prog="python -m trainer.preview", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--num_batches", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=2, help="decoded rows per component (table mode)")
    args = parser.parse_args(argv)
    run = config.load(args.gin_file, [UNUSED_MODEL_DIR, *args.gin_bindings], args.gin_search_paths)
    if args.json:
        print(json.dumps(preview(run.mixture, args.num_batches)))
    else:
        print(format_table(preview(run.mixture, args.num_batches, samples=args.samples)))
    return 0


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m trainer.preview"))
