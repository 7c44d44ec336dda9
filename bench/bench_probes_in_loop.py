"""In-loop probes as a share of training time: one scoring of TrainConfig.probe_sets on the live parameters against
the run's train step, at the default frequency (TrainConfig.probe_every).

    python -m bench.bench_probes_in_loop [--gin_file=F ...] [--gin.KEY=VALUE ...] [--steps 10] [--repeats 3]

Default run: the demo (runs/demo.gin: demo model, 8 x 128 tokens) with the durability demo's probe sets
(animal_welfare, animal_welfare_lexical, neutral_control) unless the bindings name others. Both sides use the run's
model, mesh and batch shape on a randomly initialised state (values do not change the time): the compiled train step
on a batch of random tokens, and the in-loop scorer (eval.live_probes, what train.py calls every probe_every steps)
on the same state. They alternate in one process: each repeat times `--steps` steps and one scoring. Reported: the
median step and scoring times, each one's compile time, and the share of wall time the probes take at probe_every
steps between scorings, probe / (probe_every x step + probe), for the default and a few other frequencies.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DEFAULT_SETS = ("eval/probe_sets/animal_welfare.jsonl", "eval/probe_sets/animal_welfare_lexical.jsonl")
DEFAULT_CONTROL = "eval/probe_sets/neutral_control.jsonl"


def run(gin_files: list[str], bindings: list[str], steps: int, repeats: int) -> dict:
    import jax

    from eval import live_probes
    from experiments import estimate
    from trainer import config
    from trainer.run_config import TrainConfig

    bindings = ["MODEL_DIR = 'unused'", *bindings]
    if not config.load(gin_files or [config.DEFAULT_RUN], bindings).train.probe_sets:
        bindings += [f"TrainConfig.probe_sets = {DEFAULT_SETS!r}", f"TrainConfig.probe_control = {DEFAULT_CONTROL!r}"]
    run_config = config.load(gin_files or [config.DEFAULT_RUN], bindings)
    t = run_config.train
    mesh, program, state, batch = estimate.random_step_inputs(run_config)
    sets = live_probes.read_sets(t)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        step = program.train_step.lower(state, program.example_batch(t.batch_size, t.seq_len)).compile()
        step_compile = time.perf_counter() - start
        scorer = sets.scorer(run_config, mesh, program.graphdef)
        start = time.perf_counter()
        scorer(state.params)  # compiles one shape per set
        probe_first = time.perf_counter() - start
        state, metrics = step(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        step_times, probe_times = [], []
        for _ in range(repeats):
            for _ in range(steps):
                start = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                step_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            scorer(state.params)
            probe_times.append(time.perf_counter() - start)
    step_s, probe_s = statistics.median(step_times), statistics.median(probe_times)
    default_every = TrainConfig.__dataclass_fields__["probe_every"].default
    shares = {every: probe_s / (every * step_s + probe_s) for every in sorted({default_every, 10, 50, 500})}
    m = run_config.model
    return {"run": gin_files or [config.DEFAULT_RUN], "bindings": bindings[1:],
            "model": f"{m.num_layers} layers x {m.hidden_size}, vocab {m.vocab_size}, compute {m.compute_dtype}",
            "batch": f"{t.batch_size} x {t.seq_len} tokens", "devices": f"{mesh.devices.size} {jax.devices()[0]}",
            "sets": {name: len(pairs) for name, pairs in sets.pairs.items()}, "probe_batch_size": t.probe_batch_size,
            "step_compile_s": step_compile, "probe_first_call_s": probe_first, "step_median_s": step_s,
            "probe_median_s": probe_s, "steps_timed": len(step_times), "probes_timed": len(probe_times),
            "default_probe_every": default_every, "probe_share_of_wall_time": shares,
            "probe_in_steps": probe_s / step_s}


def main() -> None:
    from trainer import config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_gin_flags(parser)
    parser.add_argument("--steps", type=int, default=10, help="train steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (each: --steps steps, then one scoring)")
    parser.add_argument("--out", default=None, help="also write the results JSON here")
    args = parser.parse_args()
    results = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
               **run(args.gin_file, args.gin_bindings, args.steps, args.repeats),
               "load_average_at_end": os.getloadavg()}
    from bench.bench_models import print_and_save

    print_and_save(results, args.out)


if __name__ == "__main__":
    import host_memory

    host_memory.use_huge_pages()  # as train.py runs
    main()
