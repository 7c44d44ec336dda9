"""How well a FLOPs-based estimate predicts a run's time, on this machine's CPU: the priced dry run's formula
(steps x FLOPs per step / (peak x MFU): launch.step_time, with this CPU's measured fp32 matmul peak in place of a
TPU's) calibrated on one shape and applied to others, against what train.py then takes.

    python bench/bench_estimate.py [--steps 60] [--json out.json]

1. peak: trainer.metrics.measure_matmul_peak (the best of 5 fp32 1024^3 matmuls).
2. FLOPs per step of each shape: XLA's cost analysis of its train step compiled here (the demo model with its layers
   unrolled: a loop's body would be counted once).
3. MFU: measured on the first shape (the calibration shape) by experiments.estimate.measure (compile + 3 steps of a
   random model): FLOPs / (step seconds x peak).
4. For every shape: the estimate steps x FLOPs / (peak x MFU), then `train.py` run for `--steps` steps of that shape
   (runs/demo.gin, the same settings); its goodput.json gives the seconds of its optimizer steps (productive) and its
   wall time. The ratios estimate / productive and estimate / wall are printed for each shape.
The first shape's ratio shows how far a 3-step measurement is from a whole run; the others, how far the FLOPs
carry an MFU from one shape to another.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU calibration, also where libtpu is installed

SHAPES = [(8, 128), (8, 256), (16, 128), (4, 512)]  # (batch, sequence length); the first calibrates
SETTINGS = ["ModelConfig.scan_layers=False", "TrainConfig.eval_every=None", "RunConfig.eval_mixture=None",
            "TrainConfig.progress_bar=False", "TrainConfig.microbatches=1", "TrainConfig.loss_chunk=None",
            "CheckpointConfig.export_dtype='float32'"]


def bindings(batch: int, seq: int) -> list[str]:
    return [f"BATCH_SIZE={batch}", f"SEQ_LEN={seq}", *SETTINGS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each train.py run")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args()

    import jax

    from experiments import estimate
    from trainer import config, goodput, metrics

    peak = metrics.measure_matmul_peak()
    print(f"peak {peak / 1e9:.1f} GFLOP/s (fp32 matmul, {jax.devices()[0].device_kind})", flush=True)
    rows = []
    mfu = None
    for batch, seq in SHAPES:
        run = config.load(["runs/demo.gin"], ["MODEL_DIR='/unused'", *bindings(batch, seq)])
        mesh, program, state, example = estimate.random_step_inputs(run)
        with jax.set_mesh(mesh):
            flops = float(program.train_step.lower(state, example).compile().cost_analysis()["flops"])
        if mfu is None:
            measured = estimate.measure(run)
            mfu = flops / (measured.seconds * peak)
            print(f"calibration on {batch}x{seq}: {measured.seconds * 1e3:.1f} ms/step, MFU {mfu:.1%}", flush=True)
        est = args.steps * flops / (peak * mfu)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(REPO / "train.py"), "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR={tmp}/run",
                   f"--gin.TRAIN_STEPS={args.steps}", *[f"--gin.{b}" for b in bindings(batch, seq)]]
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=3600)
            total = goodput.totals(goodput.read(pathlib.Path(tmp) / "run"))
        row = {"batch": batch, "seq_len": seq, "flops_per_step": flops, "formula_ratio":
               flops / (metrics.train_flops_per_token(run.model, seq) * batch * seq), "estimate_s": est,
               "productive_s": total["seconds"]["productive"], "wall_s": total["wall_s"],
               "compile_s": total["seconds"].get("compile", 0.0)}
        row["estimate_over_productive"] = est / row["productive_s"]
        row["estimate_over_wall"] = est / row["wall_s"]
        rows.append(row)
        print(f"{batch:>3}x{seq:<4} {flops / 1e9:8.2f} GFLOP/step ({row['formula_ratio']:.2f}x formula)  estimate "
              f"{est:6.1f} s  productive {row['productive_s']:6.1f} s ({row['estimate_over_productive']:.2f}x)  wall "
              f"{row['wall_s']:6.1f} s ({row['estimate_over_wall']:.2f}x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "mfu": mfu, "steps": args.steps, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
