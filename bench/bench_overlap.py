"""Input/compute overlap of the training loop: demo-model steps/s with overlap off and on, also with slow input.

    python bench/bench_overlap.py [--steps 20] [--repeats 3] [--json out.json]

Runs the real step loop (trainer.step_loop.StepLoop) of the demo run, compiled once. Each variant is timed `--repeats`
times, the variants alternating, each run over `--steps` steps (after 2 warm-up steps) on a freshly built pipeline,
by the wall time of the whole loop, so preparing batches, dispatching steps and fetching metrics all count; the
median is reported. Variants:
  off: MixtureConfig.prefetch=0 and TrainConfig.async_metrics=False (the loop before the overlap: the next batch is
       prepared only after the step's metrics arrived)
  on:  the defaults (a background thread prepares the next batches; metrics are fetched one step late)
each with the demo input pipeline as it is and made artificially slow: a sleep per batch of about one step's time
(measured by a first calibration run with overlap off, not in the table). With overlap, the slow input should cost
almost nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from data import pipeline as data_pipeline  # noqa: E402
from trainer import config, program as program_lib, run_setup, step_loop  # noqa: E402

WARMUP = 2


@contextlib.contextmanager
def slow_input(delay_s: float):
    """Adds `delay_s` of sleep to every batch the pipeline assembles: below the prefetch thread, where tokenizing and
    packing happen (a bench-only patch of the pipeline's batching iterator)."""
    original = data_pipeline._ShardBatchIterator.__next__

    def slow_next(self):
        time.sleep(delay_s)
        return original(self)

    if delay_s:
        data_pipeline._ShardBatchIterator.__next__ = slow_next
    try:
        yield
    finally:
        data_pipeline._ShardBatchIterator.__next__ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_overlap_")
    run = config.load(["runs/demo.gin"], [f"MODEL_DIR = '{tmp}'", "TRAIN_STEPS = 100000", "CHECKPOINT_EVERY = 100000",
                                          "TrainConfig.eval_every = None", "TrainConfig.progress_bar = False",
                                          "TrainConfig.log_every = 100000", "TrainConfig.peak_flops = 1e12"])
    setup = run_setup.Setup.create(run)
    run = run_setup.effective_run(setup)
    program = program_lib.build(run, setup.mesh, len(setup.pipe.component_names))
    state, tokens_seen = run_setup.initial_state(setup, run, program)
    steps = run_setup.compile_steps(program, state, run, 0)
    not_stopping = types.SimpleNamespace(requested=False)

    def steps_per_s(prefetch: int, async_metrics: bool, delay_s: float) -> float:
        """One timed run of --steps steps (after WARMUP untimed ones) on a freshly built pipeline."""
        nonlocal state
        with slow_input(delay_s), jax.set_mesh(setup.mesh):
            pipe = data_pipeline.build(dataclasses.replace(run.mixture, prefetch=prefetch))
            for n in (WARMUP, args.steps):
                train = dataclasses.replace(run.train, async_metrics=async_metrics, train_steps=int(state.step) + n)
                loop = step_loop.StepLoop(dataclasses.replace(run, train=train), dataclasses.replace(setup, pipe=pipe),
                                          steps, state, tokens_seen, pathlib.Path(tmp))
                start = time.perf_counter()
                loop.run(not_stopping)
                rate = n / (time.perf_counter() - start)
                state = loop.state
            pipe.iterator.close()
        return rate

    delay = 1.0 / steps_per_s(0, False, 0.0)  # about one step's time (overlap off); also warms everything up
    variants = [(name, prefetch, async_metrics, d) for d in (0.0, delay)
                for name, prefetch, async_metrics in (("off", 0, False), ("on", 2, True))]
    rates: dict[tuple, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # variants alternate, so a change of load from other jobs hits all of them alike
        for v in variants:
            rates[v].append(steps_per_s(*v[1:]))
    rows = []
    for (name, _, _, d), r in rates.items():
        rows.append({"overlap": name, "input_delay_s": d, "steps_per_s": statistics.median(r), "runs": r})
        print(f"overlap {name:3s}  input delay {d * 1e3:5.0f} ms/batch: {statistics.median(r):6.2f} steps/s "
              f"(runs: {', '.join(f'{x:.2f}' for x in r)})", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows},
                                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
