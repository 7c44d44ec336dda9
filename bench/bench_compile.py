"""Train-step compile time vs depth: scanned layers (one traced block) against an unrolled layer list.

    python bench/bench_compile.py [--layers 4 16 32] [--repeats 3] [--json out.json]

SmolLM2-135M's layer shapes (models/smollm2_135m.gin) with `num_layers` set to each depth, batch 4 x 256, one
device. Each variant builds the real train program (trainer.program.build: AdamW, loss, jitted step) and lowers and
compiles it from abstract shapes (nothing is allocated); trace+lower and XLA compile are timed apart. The persistent
compilation cache is off and in-memory caches are cleared before every repeat, so each repeat compiles from scratch;
medians are reported, with each depth's ratio to the 4-layer compile of the same layout.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from models.sharding import make_mesh  # noqa: E402
from trainer import config, program  # noqa: E402

BATCH, SEQ = 4, 256


def compile_once(layers: int, scan: bool) -> tuple[float, float]:
    """(trace + lower seconds, compile seconds) of the train step."""
    run = config.load(["runs/demo.gin", "models/smollm2_135m.gin"],
                      ["MODEL_DIR = '/tmp/bench_compile'", f"BATCH_SIZE = {BATCH}", f"SEQ_LEN = {SEQ}",
                       f"ModelConfig.num_layers = {layers}", f"ModelConfig.scan_layers = {scan}"])
    mesh = make_mesh(devices=jax.devices()[:1])
    prog = program.build(run, mesh, num_components=1)
    jax.clear_caches()
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        lowered = prog.train_step.lower(prog.abstract_state, prog.example_batch(BATCH, SEQ))
        traced = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
    return traced - start, done - traced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", type=int, default=[4, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    for scan in (True, False):
        for layers in args.layers:
            runs = [compile_once(layers, scan) for _ in range(args.repeats)]
            lower, comp = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append({"layout": "scan" if scan else "unrolled", "layers": layers, "trace_lower_s": lower,
                         "compile_s": comp, "total_s": lower + comp, "runs": runs})
            print(f"{rows[-1]['layout']:>8} {layers:3d} layers: trace+lower {lower:6.1f}s  compile {comp:6.1f}s",
                  flush=True)
    for row in rows:
        base = next(r for r in rows if r["layout"] == row["layout"] and r["layers"] == args.layers[0])
        row[f"total_vs_{args.layers[0]}_layers"] = row["total_s"] / base["total_s"]
    result = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "batch": BATCH, "seq": SEQ,
              "load_average": os.getloadavg(), "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
