"""Held-out loss of any checkpoint, per mixture component and on a general-text set (capability retention).

    python -m eval.heldout --model RUN_DIR [--component synthetic=heldout_docs.jsonl] [--general general.jsonl]
    python -m eval.heldout --model HF_DIR --gin_file runs/demo.gin --general general.jsonl --batches 16 --json

Every component is read through the training data pipeline (`data.pipeline.build`: same tokenizer, document format,
prefix, packing and loss mask) as a one-component mixture over a single unshuffled pass, and scored with the
trainer's own loss (`trainer.step.eval_step` -> `trainer.loss`), so the numbers are comparable with the training
loss in metrics.jsonl. The mixture comes from `--gin_file`/`--gin.K=V` or, for a run or step directory, the run's
config.gin. Point each component at held-out documents with `--component NAME=PATH[,PATH...]`: without it the
component's training files are read (reported in the result's `paths`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import storage
from data import pipeline as data_pipeline
from data.config import Component, MixtureConfig, single_component_mixture
from eval import loading
from trainer import config as trainer_config
from trainer.loss import mean_loss, zero_sums
from trainer.step import eval_step

RESULT_FILE = "heldout.json"
GENERAL = "general"


def heldout_components(mixture: MixtureConfig, overrides: Mapping[str, Sequence[str]],
                       general: Sequence[str]) -> list[Component]:
    """The mixture's active components with paths replaced by `overrides`, plus a plain-text `general` component."""
    by_name = {c.name: c for c in mixture.active_components}
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        raise ValueError(f"--component names {unknown} are not active mixture components {sorted(by_name)}")
    comps = [dataclasses.replace(c, paths=tuple(overrides[c.name])) if c.name in overrides else c
             for c in by_name.values()]
    if general:
        if GENERAL in by_name:
            raise ValueError(f"the mixture already has a component named {GENERAL!r}; rename it or drop --general")
        comps.append(Component(name=GENERAL, kind="jsonl", paths=tuple(general)))
    return comps


def component_loss(model: nnx.Module, mixture: MixtureConfig, component: Component, *, max_batches: int | None,
                   batch_size: int, step: Callable | None = None) -> dict[str, Any]:
    """Mean next-token loss over up to `max_batches` batches (None: all) of one component's single, unshuffled pass.

    `step(state, batch) -> LossSums` is the jitted eval step; pass one to reuse its compilation across components.
    """
    pipe = data_pipeline.build(single_component_mixture(mixture, component, batch_size))
    graphdef, state = nnx.split(model)
    step = step or jitted_eval_step(graphdef)
    total, batches = zero_sums(1), 0
    for batch in pipe.iterator:
        total = jax.tree.map(jnp.add, total, step(state, {k: jnp.asarray(v) for k, v in batch.items()}))
        batches += 1
        if batches == max_batches:
            break
    if float(total.weight) == 0:
        raise ValueError(f"component {component.name!r} ({list(component.paths)}) gave no target tokens")
    loss = float(mean_loss(total))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "target_tokens": int(total.weight),
            "batches": batches, "paths": list(component.paths)}


def jitted_eval_step(graphdef) -> Callable:
    return jax.jit(lambda s, b: eval_step(s, b, graphdef=graphdef, num_components=1))


def evaluate(model_path: str | pathlib.Path, mixture: MixtureConfig, *, overrides: Mapping[str, Sequence[str]] = {},
             general: Sequence[str] = (), max_batches: int | None = None, batch_size: int | None = None
             ) -> dict[str, Any]:
    """Held-out loss of the checkpoint at `model_path` on every component (and `general`)."""
    comps = heldout_components(mixture, overrides, general)
    model, config, _ = loading.load_model(model_path)
    if mixture.seq_len > config.max_position_embeddings:
        raise ValueError(f"mixture seq_len {mixture.seq_len} exceeds the model's {config.max_position_embeddings} "
                         "positions")
    size = batch_size or mixture.batch_size
    step = jitted_eval_step(nnx.graphdef(model))  # one compilation: every component has the same batch shape
    return {"model": str(model_path), "seq_len": mixture.seq_len, "batch_size": size, "max_batches": max_batches,
            "components": {c.name: component_loss(model, mixture, c, max_batches=max_batches, batch_size=size,
                                                  step=step)
                           for c in comps}}


def _mixture(args: argparse.Namespace) -> tuple[MixtureConfig, int | None]:
    """The config's held-out mixture (`RunConfig.eval_mixture`) when it has one, else its training mixture; and its
    `TrainConfig.eval_batches` (None: every batch), so a run's held-out numbers are read as training read them."""
    files = list(args.gin_file)
    if not files:
        path = storage.absolute(args.model)
        run_dir = path.parent.parent if path.name.isdigit() else path
        if not (run_dir / "config.gin").is_file():
            raise ValueError(f"{args.model}: no --gin_file given and no run config.gin at {run_dir / 'config.gin'}")
        files = [str(run_dir / "config.gin")]
    run = trainer_config.load(files, args.gin_bindings, args.gin_search_paths)
    held_out = run.mixture if args.training_mixture or run.eval_mixture is None else run.eval_mixture
    return held_out, run.train.eval_batches


def _parse_overrides(items: Sequence[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, sep, paths = item.partition("=")
        if not sep or not name or not paths:
            raise ValueError(f"--component {item!r}: expected NAME=PATH[,PATH...]")
        out[name] = [p for p in paths.split(",") if p]
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m eval.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder, run directory (latest checkpoint) or step directory")
    p.add_argument("--component", action="append", default=[], help="NAME=PATH[,PATH]: held-out files for a component")
    p.add_argument("--general", action="append", default=[], help="general-text JSONL ({'text': ...} per line)")
    p.add_argument("--training_mixture", action="store_true",
                   help="read the training mixture's components even when the config defines RunConfig.eval_mixture")
    p.add_argument("--batches", type=int, default=None,
                   help="at most this many batches per component (default: the config's TrainConfig.eval_batches, "
                        "which by default is all of them: one whole pass, as training's held-out loss)")
    p.add_argument("--batch_size", type=int, help="rows per batch (default: the mixture's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", help=f"result file (default: {RESULT_FILE} beside the checkpoint, see docs/eval.md)")
    trainer_config.add_gin_flags(p)
    args = p.parse_args(argv)
    if (args.batches is not None and args.batches < 1) or (args.batch_size is not None and args.batch_size < 1):
        p.error("--batches and --batch_size must be positive")
    mixture, run_batches = _mixture(args)
    result = evaluate(args.model, mixture, overrides=_parse_overrides(args.component), general=args.general,
                      max_batches=args.batches or run_batches, batch_size=args.batch_size)
    out = storage.Path(args.out) if args.out else loading.results_dir(args.model) / RESULT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in result["components"].items():
            print(f"{name:<16} loss={r['loss']:.4f} ppl={r['perplexity']:.2f} tokens={r['target_tokens']}")
    return result


if __name__ == "__main__":
    import exit_codes
    import host_memory

    host_memory.use_huge_pages()
    sys.exit(exit_codes.run(main, "python -m eval.heldout"))
