"""Data pipeline throughput: non-padding tokens/s from raw JSONL to packed batches (in-process, 1 and 2 Grain worker
processes) and from pre-tokenized ArrayRecord shards, on the demo corpus (KJV replay + synthetic welfare, 0.9/0.1).

    python bench/bench_data.py [--seconds 8] [--tokenizer demo|smollm2] [--seq_len 1024] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import demo  # noqa: E402
from data.config import Component, MixtureConfig  # noqa: E402
from data.pipeline import build  # noqa: E402
from data.pretokenize import pretokenize  # noqa: E402


def measure(config: MixtureConfig, seconds: float) -> dict:
    """Builds the pipeline, warms it up (first batches, worker start), then counts non-padding tokens for `seconds`."""
    t0 = time.perf_counter()
    pipeline = build(config)
    first = next(pipeline.iterator)
    startup = time.perf_counter() - t0
    tokens_before = sum(c["tokens"] for c in pipeline.stats()["components"].values())
    del first
    t0 = time.perf_counter()
    batches = 0
    while time.perf_counter() - t0 < seconds:
        next(pipeline.iterator)
        batches += 1
    elapsed = time.perf_counter() - t0
    stats = pipeline.stats()
    tokens = sum(c["tokens"] for c in stats["components"].values()) - tokens_before
    return {"tokens_per_s": tokens / elapsed, "batches": batches, "startup_s": startup,
            "token_shares": {n: c["token_share"] for n, c in stats["components"].items()},
            "padding_fraction": stats["padding_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--tokenizer", choices=("demo", "smollm2"), default="demo")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    assets = demo.prepare(REPO / "cache")
    if args.tokenizer == "smollm2":
        from tests.assets import smollm2_dir

        tokenizer = str(smollm2_dir())
    else:
        tokenizer = str(assets.tokenizer_dir)
    raw = (Component("replay", paths=(str(assets.replay_jsonl),)),
           Component("synthetic", paths=(str(assets.welfare_jsonl),)))

    def config(components, workers):
        return MixtureConfig(components=components, weights={"replay": 0.9, "synthetic": 0.1}, tokenizer=tokenizer,
                             seq_len=args.seq_len, batch_size=args.batch_size, block_size=1000, worker_count=workers)

    results = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
               "tokenizer": args.tokenizer, "seq_len": args.seq_len, "batch_size": args.batch_size}
    for workers in (0, 1, 2):
        results[f"jsonl_workers_{workers}"] = measure(config(raw, workers), args.seconds)
        print(f"raw JSONL, {workers} workers: {results[f'jsonl_workers_{workers}']['tokens_per_s']:,.0f} tokens/s",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for c in raw:
            pretokenize(config(raw, 0), c.name, f"{tmp}/{c.name}", num_files=4, processes=2)
        results["pretokenize_s"] = time.perf_counter() - t0
        pre = tuple(Component(c.name, kind="pretokenized", paths=(f"{tmp}/{c.name}/*.array_record",)) for c in raw)
        for workers in (0, 2):
            results[f"pretokenized_workers_{workers}"] = measure(config(pre, workers), args.seconds)
            print(f"pretokenized, {workers} workers: "
                  f"{results[f'pretokenized_workers_{workers}']['tokens_per_s']:,.0f} tokens/s", flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
