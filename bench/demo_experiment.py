"""Demonstration: does a 25% token share of synthetic welfare documents move the demo model's probe margins beyond
the neutral-control shift, against a 0% twin (same seed, same steps), over several seeds per arm?

    python bench/demo_experiment.py prepare [--seeds 0 1 2] [--steps 300] [--share 0.25] [--matched_control]
    python bench/demo_device.py .demo/prep .demo/out     # any JAX device (CPU works, slowly)
    python bench/demo_experiment.py analyze .demo/out/results.json --prep .demo/prep

prepare: for every (arm, seed) the run config is loaded exactly as train.py loads it (`trainer.config.load` of
  runs/demo.gin plus --gin bindings) and its first STEPS global batches are drawn from `data.pipeline.build`:
    base     MIXTURE_WEIGHTS = {'replay': 1.0, 'synthetic': 0.0}
    welfare  MIXTURE_WEIGHTS = {'replay': 1-share, 'synthetic': share}
    control  (--matched_control) the same share of matched urban-density documents (mixtures/demo_control.gin)
  with SEED = s (model init and data order) and TRAIN_STEPS = STEPS; plus held-out batches (KJV chapters the replay
  never used; welfare documents rendered with an unused seed), the tokenizer and the probe sets -> PREP_DIR.
analyze: rebuilds run directories (metrics.jsonl, config.gin, eval/hf/probes-*.json, eval/hf/heldout.json) from the device
  results, compares welfare against base (and control) with `eval.probes.report` (paired by seed, with the
  neutral-control set) and runs `eval.report` -> OUT (committed: summary.json, comparisons, report table and plots).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import demo  # noqa: E402
from data import pipeline as data_pipeline  # noqa: E402
from eval import heldout, loading, probe_pairs, probes, report, stats  # noqa: E402
from trainer import config as trainer_config  # noqa: E402

SETS = REPO / "eval" / "probe_sets"
VALUE_SETS = ("animal_welfare", "human_compassion", "animal_welfare_lexical")
CONTROL_SET = "neutral_control"
HELDOUT_KJV_CHAPTERS = (900, 940)  # the demo replay uses the first 400
HELDOUT_BATCHES = 8


def gin_args(arm: str, share: float) -> tuple[list[str], dict[str, float]]:
    files = ["runs/demo.gin"] + (["mixtures/demo_control.gin"] if arm == "control" else [])
    if arm == "base":
        return files, {"replay": 1.0, "synthetic": 0.0}
    if arm in ("welfare", "control"):
        return files, {"replay": round(1 - share, 6), "synthetic": share}
    raise ValueError(f"unknown arm {arm!r}")


def _narrow(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks `[B, S]` batches to `[steps, B, S]` in the narrowest exact dtypes (checked), to keep transfers small."""
    out = {}
    for key, dtype in (("tokens", np.uint16), ("segment_ids", np.uint16), ("positions", np.uint16),
                       ("loss_mask", np.float16), ("component", np.uint8)):
        wide = np.stack([b[key] for b in batches])
        narrow = wide.astype(dtype)
        if not np.array_equal(narrow.astype(wide.dtype), wide):
            raise ValueError(f"batch key {key!r} does not fit {np.dtype(dtype).name}")
        out[key] = narrow
    return out


def _draw(mixture, steps: int) -> dict[str, np.ndarray]:
    it = data_pipeline.build(mixture).iterator
    return _narrow([next(it) for _ in range(steps)])


def prepare(args: argparse.Namespace) -> None:
    prep = args.prep
    (prep / "batches").mkdir(parents=True, exist_ok=True)
    arms = ["base", "welfare"] + (["control"] if args.matched_control else [])
    runs, mixture = [], None
    for seed in args.seeds:
        for arm in arms:
            files, weights = gin_args(arm, args.share)
            bindings = [f"MIXTURE_WEIGHTS = {weights!r}", f"SEED = {seed}", f"TRAIN_STEPS = {args.steps}",
                        f"MODEL_DIR = 'runs/demo_experiment/{args.tag}{arm}_s{seed}'"]
            bindings += [f"BATCH_SIZE = {args.batch_size}"] if args.batch_size else []
            cfg = trainer_config.load(files, bindings)
            mixture = mixture or cfg.mixture
            name = f"{args.tag}{arm}_s{seed}"
            np.savez_compressed(prep / "batches" / f"{name}.npz", **_draw(cfg.mixture, args.steps))
            runs.append({"name": name, "tag": args.tag, "arm": arm, "seed": seed, "share": weights["synthetic"],
                         "steps": args.steps,
                         "gin_files": files, "gin_bindings": bindings, "config_gin": cfg.gin_text,
                         "batches": f"batches/{name}.npz", "model": cfg.model.to_hf(),
                         "runtime": {k: getattr(cfg.model, k) for k in ("param_dtype", "compute_dtype", "scan_layers",
                                                                        "remat", "attention")},
                         "optimizer": dataclasses.asdict(cfg.optimizer), "z_loss": cfg.train.z_loss,
                         "components": [c.name for c in cfg.mixture.active_components]})
            print("prepared", name, flush=True)
    held = heldout_sources(prep)
    full = trainer_config.load(["runs/demo.gin"], ["MODEL_DIR = 'unused'"]
                               + ([f"BATCH_SIZE = {args.batch_size}"] if args.batch_size else [])).mixture
    comps = {c.name: c for c in heldout.heldout_components(full, {k: [str(v)] for k, v in held.items()}, [])}
    (prep / "heldout").mkdir(exist_ok=True)
    for name, comp in comps.items():
        single = heldout.single_component_mixture(full, comp, full.batch_size)
        np.savez_compressed(prep / "heldout" / f"{name}.npz", **_draw(single, HELDOUT_BATCHES))
    shutil.copytree(pathlib.Path(mixture.tokenizer), prep / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(SETS, prep / "probe_sets", dirs_exist_ok=True)
    manifest = {"runs": runs, "heldout": {n: f"heldout/{n}.npz" for n in comps},
                "heldout_sources": {k: str(v) for k, v in held.items()},
                "probe_sets": list(VALUE_SETS) + [CONTROL_SET], "tokenizer": str(mixture.tokenizer)}
    (prep / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def heldout_sources(prep: pathlib.Path) -> dict[str, pathlib.Path]:
    kjv = prep / "heldout_kjv.jsonl"
    chapters = demo.kjv_chapters(HELDOUT_KJV_CHAPTERS[1])[HELDOUT_KJV_CHAPTERS[0]:]
    kjv.write_text("".join(json.dumps({"text": t}) + "\n" for t in chapters))
    welfare = prep / "heldout_welfare.jsonl"
    subprocess.run([sys.executable, "-m", "data.synth", "render", "--spec", "animal_welfare", "--count", "40",
                    "--seed", "977", "--out", str(welfare)], cwd=REPO, check=True)
    return {"replay": kjv, "synthetic": welfare}


def write_run_dir(root: pathlib.Path, run: dict, res: dict, pair_sets: dict) -> pathlib.Path:
    """A run directory in the layout eval.report reads (docs/eval.md), from one device result."""
    run_dir = root / run["name"]
    results = run_dir / loading.RESULTS / "hf"  # where eval.report reads the final export's results
    results.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in res["metrics"]))
    (run_dir / "config.gin").write_text(run["config_gin"])
    for name, pairs in pair_sets.items():
        out = probes.report(pairs, np.asarray(res["margins"][name]))
        out["config"] = {"pairs": f"eval/probe_sets/{name}.jsonl", "models": [run["name"]]}
        (results / f"probes-{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / "heldout.json").write_text(json.dumps({"components": res["heldout"]}, indent=1) + "\n")
    return run_dir


ARM_PAIRS = (("welfare", "base"), ("welfare", "control"), ("control", "base"))


def compare(results: dict, runs: list[dict], treat: str, base: str, pair_sets: dict, comparisons: int) -> dict:
    tag = runs[0]["tag"]
    seeds = sorted({r["seed"] for r in runs if r["arm"] == treat} & {r["seed"] for r in runs if r["arm"] == base})
    margins = {arm: {s: np.stack([results[f"{tag}{arm}_s{seed}"]["margins"][s] for seed in seeds]) for s in pair_sets}
               for arm in (treat, base)}
    out = {"seeds": seeds}
    for value_set in VALUE_SETS:
        out[value_set] = probes.report(
            pair_sets[value_set], margins[treat][value_set], baseline=margins[base][value_set],
            control=(margins[treat][CONTROL_SET], margins[base][CONTROL_SET]), paired_runs=True,
            adjusted_level=stats.bonferroni_level(comparisons))
    return out


def analyze(args: argparse.Namespace) -> None:
    """Several device result files and prep folders (e.g. more seeds prepared later) are merged by run name."""
    results = {k: v for path in args.results for k, v in json.loads(path.read_text()).items()}
    manifests = [json.loads((prep / "manifest.json").read_text()) for prep in args.prep]
    manifest = manifests[0]
    runs = [r for m in manifests for r in m["runs"] if r["name"] in results]
    pair_sets = {s: probe_pairs.read_pairs(SETS / f"{s}.jsonl") for s in manifest["probe_sets"]}
    args.out.mkdir(parents=True, exist_ok=True)
    run_dirs = [write_run_dir(args.runs, r, results[r["name"]], pair_sets) for r in runs]
    summary = {"steps": sorted({r["steps"] for r in runs}), "share": sorted({r["share"] for r in runs}),
               "runs": {r["name"]: {"train_seconds": results[r["name"]]["train_seconds"],
                                    "device": results[r["name"]]["device"],
                                    "final_loss": results[r["name"]]["metrics"][-1]["loss"],
                                    "heldout": results[r["name"]]["heldout"]} for r in runs}}
    arms = {r["arm"] for r in runs}
    made = [(treat, base) for treat, base in ARM_PAIRS if {treat, base} <= arms]
    summary["comparisons"] = len(made) * len(VALUE_SETS)  # reported together: each also gets a Bonferroni CI
    for treat, base in made:
        full = compare(results, runs, treat, base, pair_sets, summary["comparisons"])
        (args.out / f"probes-{treat}_vs_{base}.json").write_text(json.dumps(full, indent=1) + "\n")
        summary[f"{treat}_vs_{base}"] = {"seeds": full["seeds"], **{
            s: {k: full[s]["vs_baseline"][k] for k in ("margin_diff", "margin_diff_ci95", "accuracy_diff",
                                                       "accuracy_diff_ci95", "frac_toward_chosen")}
            | {"treatment": {k: full[s]["overall"][k] for k in ("accuracy", "margin", "ci95")},
               "baseline": {k: full[s]["vs_baseline"]["baseline"][k] for k in ("accuracy", "margin", "ci95")},
               "control_shift": full[s]["vs_baseline"]["control"]["control_shift"],
               "control_shift_ci95": full[s]["vs_baseline"]["control"]["paired"]["margin_diff_ci95"],
               "difference": full[s]["vs_baseline"]["control"]["difference"],
               "difference_ci95": full[s]["vs_baseline"]["control"]["difference_ci95"],
               "difference_ci_adjusted": full[s]["vs_baseline"]["control"]["difference_ci_adjusted"]}
            for s in VALUE_SETS}}
    report.main([str(d) for d in run_dirs] + ["--out", str(args.out / "report")])
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['comparisons']} comparisons (arm pairs x value sets); Bonferroni CIs at "
          f"{stats.bonferroni_level(summary['comparisons']):.2%} each")
    for name, comp in summary.items():
        if "_vs_" not in name:
            continue
        for s in VALUE_SETS:
            c = comp[s]
            print(f"{name} {s} (seeds {comp['seeds']}): shift {c['margin_diff']:+.4f} {fmt(c['margin_diff_ci95'])}; "
                  f"neutral shift {c['control_shift']:+.4f} {fmt(c['control_shift_ci95'])}; difference "
                  f"{c['difference']:+.4f} {fmt(c['difference_ci95'])} (Bonferroni "
                  f"{fmt(c['difference_ci_adjusted'])}); toward chosen {c['frac_toward_chosen']:.2f}")


def fmt(ci: list[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    pp.add_argument("--steps", type=int, default=300)
    pp.add_argument("--share", type=float, default=0.25)
    pp.add_argument("--batch_size", type=int, help="override the demo's BATCH_SIZE (global rows per step)")
    pp.add_argument("--matched_control", action="store_true", help="also the matched control-document arm")
    pp.add_argument("--tag", default="", help="prefix of the run names (to keep variants apart)")
    pp.add_argument("--prep", type=pathlib.Path, default=REPO / ".demo" / "prep")
    pa = sub.add_parser("analyze")
    pa.add_argument("results", type=pathlib.Path, nargs="+")
    pa.add_argument("--prep", type=pathlib.Path, nargs="+", default=[REPO / ".demo" / "prep"])
    pa.add_argument("--runs", type=pathlib.Path, default=REPO / ".demo" / "runs")
    pa.add_argument("--out", type=pathlib.Path, default=REPO / "bench" / "results" / "demo_experiment")
    args = p.parse_args()
    prepare(args) if args.cmd == "prepare" else analyze(args)


if __name__ == "__main__":
    main()
