"""Trains and scores the prepared demo-experiment runs (bench/demo_experiment.py prepare) on whatever JAX device is
there: the trainer's own jitted step (`trainer.step.jit_train_step`, `trainer.optimizer`, `trainer.state`) on the
batches the data pipeline produced, HF export (`models.hf_io.save_pretrained`), held-out loss with the trainer's
`eval_step`, and probe margins with `eval.probes.score_model`. Needs only jax/flax/optax/safetensors/tokenizers/
jinja2/yaml (no gin, no grain), so it runs on a bare accelerator machine.

    python bench/demo_device.py PREP_DIR OUT_DIR [--only NAME ...] [--keep_models NAME ...]

Writes OUT_DIR/results.json: {run name: {"metrics": [...], "heldout": {...}, "margins": {set: [...]},
"train_seconds", "device"}} (rewritten after every run), and OUT_DIR/<name>.safetensors for --keep_models.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from eval import probe_pairs, probes  # noqa: E402
from models import hf_io, sharding  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from trainer import loss as loss_lib, optimizer, state as state_lib, step as step_lib  # noqa: E402
from trainer.run_config import OptimizerConfig  # noqa: E402

LOG_EVERY = 10
# Runs with the same shapes and optimizer share one compiled step (a fresh jit per run would recompile each time).
_COMPILED: dict[str, object] = {}


def load_batches(path: pathlib.Path) -> dict[str, np.ndarray]:
    """`[steps, B, S]` arrays (stored narrow) widened to the batch dtypes of docs/design.md."""
    with np.load(path) as z:
        return {"tokens": z["tokens"].astype(np.int32), "segment_ids": z["segment_ids"].astype(np.int32),
                "positions": z["positions"].astype(np.int32), "loss_mask": z["loss_mask"].astype(np.float32),
                "component": z["component"].astype(np.int32)}


def train(run: dict, prep: pathlib.Path, mesh: jax.sharding.Mesh) -> tuple[nnx.Module, list[dict], float]:
    config = ModelConfig.from_hf(run["model"], **run["runtime"])
    opt = OptimizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in run["optimizer"].items()})
    batches = load_batches(prep / run["batches"])
    steps = batches["tokens"].shape[0]
    tx, schedule = optimizer.make(opt, steps), optimizer.schedule(opt, steps)
    state = state_lib.init_sharded(config, tx, run["seed"], mesh)
    graphdef = state_lib.model_graphdef(config)
    names = run["components"]
    key = json.dumps([run["model"], run["runtime"], run["optimizer"], steps, names, run["z_loss"]], sort_keys=True)
    if key not in _COMPILED:
        _COMPILED[key] = step_lib.jit_train_step(
            sharding.state_shardings(state, mesh), mesh, batches["tokens"].shape[1], graphdef=graphdef, tx=tx,
            lr_schedule=schedule, config=step_lib.StepConfig(num_components=len(names), z_loss=run["z_loss"]))
    fn = _COMPILED[key]
    metrics, start = [], time.time()
    with jax.set_mesh(mesh):
        for i in range(steps):
            state, m = fn(state, {k: jnp.asarray(v[i]) for k, v in batches.items()})
            if (i + 1) % LOG_EVERY == 0 or i + 1 == steps:
                comp = np.asarray(m["component_loss_sum"]) / np.maximum(np.asarray(m["component_weight"]), 1.0)
                metrics.append({"step": i + 1, "loss": float(m["loss"]), "lr": float(m["lr"]),
                                "grad_norm": float(m["grad_norm"]),
                                **{f"loss/{n}": float(c) for n, c in zip(names, comp)}})
    seconds = time.time() - start
    return nnx.merge(graphdef, state.params), metrics, seconds


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(graphdef: nnx.GraphDef, params, batch: dict) -> loss_lib.LossSums:
    return step_lib.eval_step(params, batch, graphdef=graphdef, num_components=1)


def heldout_losses(model: nnx.Module, prep: pathlib.Path, heldout: dict[str, str]) -> dict[str, dict]:
    graphdef, params = nnx.split(model)
    step = functools.partial(_eval_sums, graphdef)
    out = {}
    for name, file in heldout.items():
        batches = load_batches(prep / file)
        total = loss_lib.zero_sums(1)
        for i in range(batches["tokens"].shape[0]):
            sums = step(params, {k: jnp.asarray(v[i]) for k, v in batches.items()})
            total = jax.tree.map(jnp.add, total, sums)
        out[name] = {"loss": float(loss_lib.mean_loss(total)), "target_tokens": int(total.weight),
                     "batches": int(batches["tokens"].shape[0])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prep", type=pathlib.Path)
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--only", nargs="*", help="run only these run names")
    p.add_argument("--keep_models", nargs="*", default=[], help="copy these runs' model.safetensors to OUT")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/demo_device_models"))
    args = p.parse_args()
    manifest = json.loads((args.prep / "manifest.json").read_text())
    pair_sets = {name: probe_pairs.read_pairs(args.prep / "probe_sets" / f"{name}.jsonl") for name in manifest["probe_sets"]}
    mesh = sharding.make_mesh()
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__})"
    print("device:", device, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for run in manifest["runs"]:
        if (args.only and run["name"] not in args.only) or run["name"] in results:
            continue
        model, metrics, seconds = train(run, args.prep, mesh)
        hf_dir = args.work / run["name"]
        hf_io.save_pretrained(model, hf_dir, dtype="float32", tokenizer_dir=args.prep / "tokenizer")
        margins = probes.score_model(hf_dir, list(pair_sets.values()), batch_size=64)
        results[run["name"]] = {
            "metrics": metrics, "train_seconds": seconds, "device": device,
            "heldout": heldout_losses(model, args.prep, manifest["heldout"]),
            "margins": {name: m.tolist() for name, m in zip(pair_sets, margins)},
        }
        results_path.write_text(json.dumps(results) + "\n")
        if run["name"] in args.keep_models:
            shutil.copy(hf_dir / "model.safetensors", args.out / f"{run['name']}.safetensors")
        print(f"{run['name']}: loss {metrics[-1]['loss']:.4f} in {seconds:.1f}s, welfare margin "
              f"{np.mean(results[run['name']]['margins'][manifest['probe_sets'][0]]):+.4f}", flush=True)


if __name__ == "__main__":
    main()
