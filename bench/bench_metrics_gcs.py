"""Cost of writing one metrics record to a gs:// MODEL_DIR over a 1,000-record run, against the local GCS emulator:
the part-and-compose writer (trainer.metrics_file, what Sinks' writer thread does per batch) and, in the same
process, the rewrite-per-record writer it replaces (read metrics.jsonl, write it back one record longer).

    .venv/bin/python -m bench.bench_metrics_gcs [--records 1000] [--json OUT]

For each writer, medians over the first and the last 100 records of: requests, bytes uploaded (what a bucket
receives), wall seconds, and the seconds outside the emulator's handlers (the client's share: wall minus the
emulator's own work, which for a compose is concatenating the whole object in Python, done server-side by GCS with no
data sent). A writer whose cost per record does not grow has last/first close to 1. Also: the training thread's cost
of `Sinks.write` (a queue put), median over every record.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

from tests import gcs_emulator

WINDOW = 100


def record(step: int) -> dict:
    """A metrics record the size of the demo's (two mixture components)."""
    return {"step": step, "loss": 3.123456789, "lr": 0.0003, "grad_norm": 1.23456789, "tokens_per_s": 12345.678,
            "mfu": 0.123456, "step_time_s": 0.2345678, "tokens": 1024 * step, "loss/replay": 3.1234567,
            "tokens/replay": 900 * step, "loss/synthetic": 3.3456789, "tokens/synthetic": 124 * step}


def timed(write, records: int) -> list[dict]:
    """Each record's write: requests, bytes uploaded, wall seconds, seconds outside the emulator's handlers."""
    out = []
    for step in range(1, records + 1):
        with gcs_emulator.recording() as served:
            start = time.perf_counter()
            write(record(step))
            seconds = time.perf_counter() - start
        out.append({"requests": len(served), "bytes": sum(r.sent for r in served if r.handler == "insert"),
                    "s": seconds, "client_s": seconds - sum(r.seconds for r in served)})
    return out


def summary(costs: list[dict]) -> dict:
    out = {}
    for key in ("requests", "bytes", "s", "client_s"):
        out[f"first_{key}"] = statistics.median(c[key] for c in costs[:WINDOW])
        out[f"last_{key}"] = statistics.median(c[key] for c in costs[-WINDOW:])
        out[f"last_over_first_{key}"] = out[f"last_{key}"] / out[f"first_{key}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with gcs_emulator.emulator():
        import storage
        from trainer import metrics, metrics_file

        root = f"gs://{gcs_emulator.BUCKET}/bench"
        parts = metrics_file.MetricsFile(f"{root}/parts/metrics.jsonl")
        rewrite = storage.Path(f"{root}/rewrite/metrics.jsonl")

        def rewrite_whole(rec: dict) -> None:
            old = rewrite.read_text() if rewrite.exists() else ""
            rewrite.write_text(old + json.dumps(rec) + "\n")

        results = {"parts_and_compose": summary(timed(lambda rec: parts.append([rec]), args.records)),
                   "rewrite_per_record": summary(timed(rewrite_whole, args.records))}
        assert len(metrics_file.read(f"{root}/parts/metrics.jsonl")) == args.records
        sinks = metrics.Sinks(f"{root}/sinks", resume_step=0, run_name="bench")
        puts = []
        for step in range(1, args.records + 1):
            start = time.perf_counter()
            sinks.write(record(step))
            puts.append(time.perf_counter() - start)
        sinks.close()
        results["sinks_write_on_training_thread_s"] = statistics.median(puts)
    results["rewrite_over_parts_at_last"] = {
        key: results["rewrite_per_record"][f"last_{key}"] / results["parts_and_compose"][f"last_{key}"]
        for key in ("bytes", "s", "client_s")}
    results["records"] = args.records
    results["machine"] = f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
