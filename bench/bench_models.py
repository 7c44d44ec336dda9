"""Model benchmarks on SmolLM2-135M (CPU): HF import/export time and peak RSS, forward tokens/s JAX vs PyTorch eager.

    python -m bench.bench_models [--batch 4] [--seq 256] [--repeats 5] [--out results.json]

Import and export each run in a fresh subprocess so their peak RSS (ru_maxrss) is their own; the RSS right after
the imports (jax, flax, models) is reported as the baseline. The forward comparison runs both frameworks in one
process on the same token batch, alternating JAX and PyTorch runs, and reports medians and their ratio. JAX runs
jitted (compile excluded, reported separately), with and without the accurate-dot CPU options of models.xla_cpu.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_import(hf_dir: str) -> dict:
    import jax

    from models import hf_io

    baseline = _rss_mb()
    start = time.perf_counter()
    model, _ = hf_io.load_pretrained(hf_dir)
    jax.block_until_ready(jax.tree.leaves(model))
    return {"import_s": time.perf_counter() - start, "import_peak_rss_mb": _rss_mb(), "baseline_rss_mb": baseline}


def _child_export(hf_dir: str) -> dict:
    from models import hf_io

    model, _ = hf_io.load_pretrained(hf_dir)
    loaded = _rss_mb()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        hf_io.save_pretrained(model, out, dtype="bfloat16", tokenizer_dir=hf_dir)
        seconds = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    return {"export_bf16_s": seconds, "export_peak_rss_mb": _rss_mb(), "rss_before_export_mb": loaded,
            "export_bytes": size}


def _run_child(kind: str, hf_dir: str) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_models", "--child", kind, "--hf_dir", hf_dir]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forward(hf_dir: str, batch: int, seq: int, repeats: int) -> dict:
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from models import hf_io, xla_cpu

    tokens = np.random.RandomState(0).randint(0, 49152, (batch, seq)).astype(np.int32)
    model, _ = hf_io.load_pretrained(hf_dir)
    graphdef, state = nnx.split(model)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch_tokens = torch.tensor(tokens, dtype=torch.long)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    variants = {"jax_default": jax.jit(forward),
                "jax_accurate_dots": jax.jit(forward, compiler_options=xla_cpu.compiler_options())}
    compile_s = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn(state, tokens).block_until_ready()
        compile_s[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in [*variants, "torch_eager"]}
    with torch.inference_mode():
        hf_model(torch_tokens)  # warm-up
        for _ in range(repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(state, tokens).block_until_ready()
                times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            hf_model(torch_tokens)
            times["torch_eager"].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"batch": batch, "seq": seq, "repeats": repeats, "torch_threads": torch.get_num_threads(),
              "jax_compile_s": compile_s}
    for name, median in medians.items():
        result[f"{name}_tokens_per_s"] = batch * seq / median
        result[f"{name}_median_s"] = median
    for name in variants:
        result[f"{name}_speedup_vs_torch"] = medians["torch_eager"] / medians[name]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the results JSON here")
    parser.add_argument("--hf_dir", default=None, help="SmolLM2 HF folder (default: the cached test asset)")
    parser.add_argument("--child", choices=["import", "export"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_dir is None:
        from tests.assets import smollm2_dir

        args.hf_dir = str(smollm2_dir())
    if args.child:
        print(json.dumps(_child_import(args.hf_dir) if args.child == "import" else _child_export(args.hf_dir)))
        return
    results = {"model": "SmolLM2-135M-Instruct fp32", "cpu_count": os.cpu_count(),
               "load_average_at_start": os.getloadavg()}
    results.update(_run_child("import", args.hf_dir))
    results.update(_run_child("export", args.hf_dir))
    results.update(_forward(args.hf_dir, args.batch, args.seq, args.repeats))
    results["load_average_at_end"] = os.getloadavg()
    print_and_save(results, args.out)


def print_and_save(results: dict, out: str | None) -> None:
    """Prints the results as JSON and, with `out`, writes them there too."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
