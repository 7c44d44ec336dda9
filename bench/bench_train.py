"""Training throughput on this machine: docmix's jitted step vs a PyTorch/transformers AdamW step, and checkpoint cost.

    python bench/bench_train.py [--models demo smollm2_135m] [--steps 5] [--json out.json]

For each model (the demo model at the demo batch, SmolLM2-135M at batch 4 x 256): tokens/s and MFU of the docmix train
step (compiled ahead of time; compile time reported separately) against the peak fp32 matmul FLOP/s measured in the
same run, the same for a transformers LlamaForCausalLM + torch.optim.AdamW step on the same config and batch (the
faster of 1 thread and all cores), and the ratio; the frameworks' steps alternate, `--steps` rounds (each timed
step after an untimed one), medians. Then checkpoint cost: how long `Checkpointer.save` blocks the loop (device->host
copy) and the full save.
Random weights: throughput does not depend on their values.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable

# OpenMP threads that spin while waiting make PyTorch many times slower when other processes share the cores; passive
# waiting costs nothing when the machine is idle. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import interleaved_medians  # noqa: E402
from data import multihost  # noqa: E402
from models.sharding import make_mesh  # noqa: E402
from trainer import checkpoint, config, metrics, optimizer, program, state as state_lib  # noqa: E402

SHAPES = {"demo": (8, 128), "smollm2_135m": (4, 256)}


def fake_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seg = np.ones((batch, seq), np.int32)
    seg[:, seq // 2:] = 2
    pos = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(batch, 0).astype(np.int32)
    return {"tokens": rng.integers(0, vocab, (batch, seq)).astype(np.int32), "segment_ids": seg, "positions": pos,
            "loss_mask": np.ones((batch, seq), np.float32), "component": np.zeros(batch, np.int32)}


def bench_jax(run, batch: int, seq: int) -> dict:
    """The compiled train step: {"compile_s", "step": a call that runs one step and waits, "holder": [state],
    "mesh"}."""
    mesh = make_mesh(devices=jax.devices()[:1])
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, batch_size=batch, seq_len=seq,
                                                             train_steps=1000, microbatches=1))
    prog = program.build(run, mesh, num_components=1)
    holder = [state_lib.init_sharded(run.model, prog.tx, 0, mesh)]
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = prog.train_step.lower(holder[0], prog.example_batch(batch, seq)).compile()
        compile_s = time.perf_counter() - start
        b = multihost.global_batch(fake_batch(batch, seq, run.model.vocab_size), mesh, prog.batch_spec)

    def step():
        holder[0], m = compiled(holder[0], b)
        jax.block_until_ready(m)

    return {"compile_s": compile_s, "step": step, "holder": holder, "mesh": mesh}


def torch_steps(model_config, batch: int, seq: int) -> dict[int, Callable[[], None]]:
    """{threads: a call that runs one transformers + AdamW step with that many threads}, for 1 thread and all cores
    (the faster is reported)."""
    import torch
    import transformers

    hf = dict(model_config.to_hf())
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = fake_batch(batch, seq, model_config.vocab_size)
    tokens = torch.from_numpy(data["tokens"].astype(np.int64))

    def step(threads: int) -> None:
        torch.set_num_threads(threads)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return {threads: functools.partial(step, threads) for threads in sorted({1, os.cpu_count() or 1})}


def bench_checkpoint(run, state, mesh) -> dict:
    import grain

    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.Checkpointer(tmp, run.checkpoint, run.model)
        out = {}
        for i, step in enumerate((1, 2)):       # the first save also pays Orbax's one-time set-up
            tick = time.perf_counter()
            ckpt.save(state, it, {"step": step})
            blocked = time.perf_counter() - tick
            ckpt.manager.wait_until_finished()
            out[f"save{i + 1}_blocks_s"], out[f"save{i + 1}_total_s"] = blocked, time.perf_counter() - tick
        ckpt.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peak = metrics.measure_matmul_peak(n=2048, repeats=5)
    results = {"peak_fp32_matmul_flops": peak, "device": jax.devices()[0].device_kind, "models": {}}
    print(f"measured peak fp32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s")
    for name in args.models:
        files = ["runs/demo.gin"] + ([] if name == "demo" else [f"models/{name}.gin"])
        run = config.load(files, ["MODEL_DIR = '/tmp/bench'"])
        batch, seq = SHAPES[name]
        flops = metrics.train_flops_per_token(run.model, seq)
        j = bench_jax(run, batch, seq)
        by_threads = torch_steps(run.model, batch, seq)
        sides = {"docmix": {"step": j["step"]}} | {f"pytorch_{n}": {"step": fn} for n, fn in by_threads.items()}
        with jax.set_mesh(j["mesh"]):
            medians = interleaved_medians(sides, args.steps)
        j["step_s"] = medians["docmix"]["step"]
        threads = min(by_threads, key=lambda n: medians[f"pytorch_{n}"]["step"])
        t = {"step_s": medians[f"pytorch_{threads}"]["step"], "threads": threads}
        c = bench_checkpoint(run, j["holder"][0], j["mesh"])
        tokens = batch * seq
        row = {"batch": batch, "seq": seq, "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
                   state_lib.abstract(run.model, optimizer.make(run.optimizer, 10)).params)),
               "flops_per_token": flops, "jax_compile_s": j["compile_s"], "jax_step_s": j["step_s"],
               "jax_tokens_per_s": tokens / j["step_s"], "jax_mfu": tokens / j["step_s"] * flops / peak,
               "torch_step_s": t["step_s"], "torch_tokens_per_s": tokens / t["step_s"],
               "torch_mfu": tokens / t["step_s"] * flops / peak, "torch_threads": t["threads"],
               "jax_over_torch": t["step_s"] / j["step_s"], **c}
        results["models"][name] = row
        print(f"{name}: {row['params'] / 1e6:.2f}M params, batch {batch}x{seq}: docmix {row['jax_tokens_per_s']:,.0f} "
              f"tok/s (MFU {row['jax_mfu']:.1%}, compile {row['jax_compile_s']:.1f}s) vs PyTorch "
              f"{row['torch_tokens_per_s']:,.0f} tok/s (MFU {row['torch_mfu']:.1%}) -> {row['jax_over_torch']:.2f}x; "
              f"checkpoint save blocks {c['save2_blocks_s']:.2f}s of {c['save2_total_s']:.2f}s "
              f"(first save {c['save1_blocks_s']:.2f}s / {c['save1_total_s']:.2f}s)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    import host_memory

    host_memory.use_huge_pages()  # as docmix's entry points run (both frameworks share the process)
    main()
