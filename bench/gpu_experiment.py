"""The SmolLM2-135M experiment at a real dose, for one GPU: does a 25% token share of synthetic welfare documents
(over 1M synthetic tokens per run) move the value probes beyond the neutral-control shift and beyond a matched-topic
control, and how much of it is left after a short SFT wash-out?

    python bench/gpu_experiment.py --hf_dir runs/smollm2-135m-instruct [--seeds 0 1] [--dry_run] [--prepare_only]
    python bench/gpu_experiment.py --hf_dir DIR --tiny        # the same journey scaled down, on any device

Arms, each with every seed, paired by seed: base (0%: replay only), welfare (25% rendered animal-welfare documents),
control (25% rendered urban-density documents, the same renderer and lengths: a welfare-vs-control difference is the
topic's). Per arm and seed, two train.py runs (its own `main`, in this process one after the other, so JAX starts once
and the compilation cache serves repeated shapes), both with in-loop probes (TrainConfig.probe_sets: the three value
sets, TrainConfig.probe_control: the neutral set; every pair's margin in MODEL_DIR/probes.jsonl):
  midtraining  runs/midtrain.gin from --hf_dir: MIDTRAIN steps of BATCH x SEQ tokens, KJV replay + the arm's
               documents (pretokenized once), bf16 compute on fp32 master weights and moments, exported in fp32;
  wash-out     runs/sft.gin from that export on general instruction stand-in data (demo:instructions, chat),
               SFT steps of SFT_BATCH x SFT_SEQ, no export.
Phases, each skipped when done: prepare (WORK/prepared: corpora rendered and pretokenized with --hf_dir's tokenizer;
`--prepare_only` stops after it, so a machine with the data packages prepares and the GPU machine only trains), the
runs (WORK/runs; an interrupted run resumes), the analysis (OUT): results.json (the plan, each run's time and
throughput, per arm and probed step the margin over seeds [95% CI], per arm pair and value set the paired shift minus
the neutral set's shift [95% CI, Bonferroni CI over the 9 comparisons of a step], eval.stats), summary.md (the tables
at the end of midtraining and of the wash-out, the wash-out curve) and curve.png. `--dry_run` prepares the corpora
(rendering only), loads and checks every run's config as train.py will, prints the plan with its dose and estimated
GPU time, and trains nothing.

The budget (the full version): 6 midtraining runs of 128 x 32 x 1024 tokens (25% = 1,048,576 synthetic; `plan()`
checks the dose) and 6 wash-outs of 32 x 8 x 512; `plan()` estimates the GPU time from the FLOPs per token at an
assumed MFU (--assumed_mfu) plus OVERHEAD_S per run, and the runs print their measured throughput (docs/eval.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETS = REPO / "eval" / "probe_sets"
VALUE_SETS = ("animal_welfare", "animal_welfare_lexical", "human_compassion")
CONTROL_SET = "neutral_control"
ARMS = {"base": "animal_welfare", "welfare": "animal_welfare", "control": "urban_density"}  # rendered spec per arm
ARM_PAIRS = (("welfare", "base"), ("welfare", "control"), ("control", "base"))
SHARE = 0.25
DOSE = 1_000_000          # synthetic tokens a welfare or control midtraining run must see
ASSUMED_MFU = 0.15
OVERHEAD_S = 15.0         # per run: start-up, compilation (cached after the first), probes, checkpoint, export


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one version of the experiment (steps, global batch in rows, sequence length, probe interval)."""
    midtrain_steps: int
    batch: int
    seq: int
    probe_every: int
    sft_steps: int
    sft_batch: int
    sft_seq: int
    sft_probe_every: int
    documents: int        # rendered documents per corpus
    replay_chapters: int  # KJV chapters of replay text
    lr: float = 1e-4
    sft_lr: float = 5e-5
    warmup: int = 10
    sft_warmup: int = 4


FULL = Scale(128, 32, 1024, 16, 32, 8, 512, 4, documents=400, replay_chapters=1189)
TINY = Scale(2, 4, 64, 2, 2, 4, 64, 2, documents=6, replay_chapters=12, warmup=1, sft_warmup=1)


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    arm: str
    seed: int
    phase: str            # "midtrain" or "sft"
    steps: int
    files: tuple[str, ...]
    bindings: tuple[str, ...]

    def args(self) -> list[str]:
        return [f"--gin_file={f}" for f in self.files] + [f"--gin_bindings={b}" for b in self.bindings]


def probe_bindings(every: int) -> tuple[str, ...]:
    sets = tuple(str(SETS / f"{s}.jsonl") for s in VALUE_SETS)
    return (f"TrainConfig.probe_sets = {sets!r}", f"TrainConfig.probe_control = {str(SETS / f'{CONTROL_SET}.jsonl')!r}",
            f"TrainConfig.probe_every = {every}", "TrainConfig.probe_batch_size = 64")


def runs(scale: Scale, seeds: list[int], hf_dir: pathlib.Path, work: pathlib.Path) -> list[Run]:
    """Every run, seed by seed (so a run stopped early leaves whole seeds behind): the three midtrainings, then
    their wash-outs."""
    prepared, out = work / "prepared", []
    common = ("model_from_init.runtime = {'compute_dtype': 'bfloat16', 'remat': 'full'}",
              "TrainConfig.microbatches = 1", "TrainConfig.loss_chunk = 256", "TrainConfig.progress_bar = False",
              "TrainConfig.eval_every = None", "CheckpointConfig.keep_latest = 1", f"INIT_FROM = {str(hf_dir)!r}")
    for seed in seeds:
        for arm, spec in ARMS.items():
            share = 0.0 if arm == "base" else SHARE
            name = f"{arm}-midtrain-s{seed}"
            out.append(Run(name, arm, seed, "midtrain", scale.midtrain_steps, ("runs/midtrain.gin",), common + (
                f"MODEL_DIR = {str(work / 'runs' / name)!r}", f"SEED = {seed}",
                f"TRAIN_STEPS = {scale.midtrain_steps}", f"BATCH_SIZE = {scale.batch}", f"SEQ_LEN = {scale.seq}",
                f"CHECKPOINT_EVERY = {scale.midtrain_steps}",
                f"MIXTURE_WEIGHTS = {({'replay': 1 - share, 'synthetic': share})!r}",
                f"REPLAY_FILES = ({str(prepared / 'replay' / '*.array_record')!r},)",
                f"SYNTHETIC_FILES = ({str(prepared / spec / '*.array_record')!r},)",
                "replay/Component.kind = 'pretokenized'", "synthetic/Component.kind = 'pretokenized'",
                f"OptimizerConfig.learning_rate = {scale.lr}", f"OptimizerConfig.warmup_steps = {scale.warmup}",
                "CheckpointConfig.export_dtype = 'float32'", f"TrainConfig.log_every = {scale.probe_every}",
                *probe_bindings(scale.probe_every))))
        for arm in ARMS:
            name = f"{arm}-sft-s{seed}"
            out.append(Run(name, arm, seed, "sft", scale.sft_steps, ("runs/sft.gin",), common + (
                f"INIT_FROM = {str(work / 'runs' / f'{arm}-midtrain-s{seed}' / 'hf')!r}",
                f"MODEL_DIR = {str(work / 'runs' / name)!r}", f"SEED = {seed}", f"TRAIN_STEPS = {scale.sft_steps}",
                f"BATCH_SIZE = {scale.sft_batch}", f"SEQ_LEN = {scale.sft_seq}",
                f"CHECKPOINT_EVERY = {scale.sft_steps}",
                f"SFT_FILES = ({str(prepared / 'instructions.jsonl')!r},)", "SFT_FORMAT = 'chat'",
                f"OptimizerConfig.learning_rate = {scale.sft_lr}", f"OptimizerConfig.warmup_steps = {scale.sft_warmup}",
                "CheckpointConfig.export_at_end = False", f"TrainConfig.log_every = {scale.sft_probe_every}",
                *probe_bindings(scale.sft_probe_every))))
    return out


# --- prepare --------------------------------------------------------------------------------------------------------

def prepare(scale: Scale, hf_dir: pathlib.Path, work: pathlib.Path, *, pretokenize: bool) -> dict[str, Any]:
    """WORK/prepared: replay.jsonl (KJV chapters), the rendered welfare and urban-density documents, the SFT data,
    and (pretokenize) each corpus as ArrayRecord shards in --hf_dir's tokenization. Returns corpus token counts."""
    from data import demo
    from data.pretokenize import METADATA, pretokenize as write_shards
    from experiments import corpora
    from trainer import config as trainer_config
    from trainer.demo_assets import demo_asset

    prepared = work / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    replay = prepared / "replay.jsonl"
    if not replay.is_file():
        replay.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo.kjv_chapters(scale.replay_chapters)))
    if not (prepared / "instructions.jsonl").is_file():
        (prepared / "instructions.jsonl").write_text(pathlib.Path(demo_asset("instructions")).read_text())
    sources = {"replay": replay} | {spec: corpora.resolve({"render": spec, "count": scale.documents, "seed": 0},
                                                          prepared / "rendered", f"corpus {spec}")
                                    for spec in sorted(set(ARMS.values()))}
    tokens = {}
    for name, path in sources.items():
        mixture = trainer_config.load(["runs/midtrain.gin"], [  # the corpus as the midtraining reads it
            f"INIT_FROM = {str(hf_dir)!r}", "MODEL_DIR = 'unused'", f"REPLAY_FILES = ({str(path)!r},)",
            f"SYNTHETIC_FILES = ({str(path)!r},)"]).mixture
        tokens[name] = corpora.count_tokens(path, mixture.components[0], mixture)[1]
        if pretokenize and not (prepared / name / METADATA).is_file():
            write_shards(mixture, "replay", str(prepared / name), num_files=4, processes=4)
    return tokens


# --- plan -----------------------------------------------------------------------------------------------------------

def plan(scale: Scale, seeds: list[int], all_runs: list[Run], corpus_tokens: dict[str, int], hf_dir: pathlib.Path,
         *, peak_flops: float, mfu: float) -> dict[str, Any]:
    """Every run's tokens, synthetic tokens, epochs per document and estimated GPU seconds, loading each config as
    train.py will (a binding or share that does not hold is an error here, before anything trains; a wash-out is
    loaded from --hf_dir, which has its midtraining export's network and tokenizer)."""
    from trainer import config as trainer_config
    from trainer.metrics import train_flops_per_token

    if len(seeds) < 2:
        raise ValueError(f"--seeds: the comparisons pair arms by seed and need at least 2 seeds, got {seeds}")
    rows, total = [], 0.0
    for run in all_runs:
        config = trainer_config.load(run.files, [*run.bindings, f"INIT_FROM = {str(hf_dir)!r}"])
        config.mixture.check_run()
        tokens = run.steps * config.train.batch_size * config.train.seq_len
        share = config.mixture.weights.get("synthetic", 0.0)
        seconds = tokens * train_flops_per_token(config.model, config.train.seq_len) / (peak_flops * mfu)
        total += seconds + OVERHEAD_S
        rows.append({"run": run.name, "steps": run.steps, "tokens": tokens, "synthetic_tokens": round(share * tokens),
                     "epochs_per_document": share * tokens / corpus_tokens[ARMS[run.arm]] if share else None,
                     "estimated_seconds": seconds})
    dosed = [r for r in rows if r["synthetic_tokens"]]
    return {"runs": rows, "estimated_seconds": total, "dose_met": all(r["synthetic_tokens"] >= DOSE for r in dosed),
            "corpus_tokens": corpus_tokens, "scale": dataclasses.asdict(scale), "seeds": seeds,
            "assumption": f"{mfu:.0%} MFU of {peak_flops / 1e12:.0f} TFLOP/s, {OVERHEAD_S:.0f} s per run besides"}


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"{'run':<22} {'steps':>6} {'tokens':>10} {'synthetic':>10} {'epochs/doc':>10} {'est. s':>7}"]
    for r in p["runs"]:
        epochs = f"{r['epochs_per_document']:.3f}" if r["epochs_per_document"] else "-"
        lines.append(f"{r['run']:<22} {r['steps']:>6} {r['tokens']:>10} {r['synthetic_tokens']:>10} {epochs:>10} "
                     f"{r['estimated_seconds']:>7.1f}")
    lines.append(f"estimated GPU time {p['estimated_seconds']:.0f} s ({p['assumption']}); dose of >= {DOSE:,} "
                 f"synthetic tokens per dosed run: {'met' if p['dose_met'] else 'NOT met'}")
    return "\n".join(lines)


# --- train ----------------------------------------------------------------------------------------------------------

def finished(run: Run, work: pathlib.Path) -> bool:
    records = probe_records(work / "runs" / run.name)
    return bool(records) and records[-1]["step"] == run.steps and (
        run.phase == "sft" or (work / "runs" / run.name / "hf" / "config.json").is_file())


def probe_records(model_dir: pathlib.Path) -> list[dict[str, Any]]:
    """MODEL_DIR/probes.jsonl (trainer.probes_in_loop) by step, a step scored twice (after a resume) taken last."""
    path = model_dir / "probes.jsonl"
    if not path.is_file():
        return []
    records = {r["step"]: r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}
    return [records[s] for s in sorted(records)]


def train_all(all_runs: list[Run], work: pathlib.Path, estimate: float) -> dict[str, dict[str, Any]]:
    """Runs every unfinished run through train.py's main; stops at the first failure (the next runs would repeat
    it). Returns {run: {"seconds", "tokens_per_s", "step_time_s", "loss"}} of the runs trained here."""
    import jax

    import train

    jax.config.update("jax_compilation_cache_dir", str(work / "jax_cache"))
    done: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for i, run in enumerate(all_runs):
        if finished(run, work):
            continue
        began = time.perf_counter()
        code = train.main(run.args())
        if code != 0:
            raise RuntimeError(f"{run.name}: train.py exited {code} (its message is above); nothing after it ran")
        records = [json.loads(line) for line in (work / "runs" / run.name / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r.get("step_time_s")]
        done[run.name] = {"seconds": time.perf_counter() - began, "loss": records[-1].get("loss"),
                          "step_time_s": statistics.median(r["step_time_s"] for r in timed) if timed else None,
                          "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed) if timed else None}
        spent = time.perf_counter() - start
        print(f"[{spent:6.0f}s] {run.name}: {done[run.name]['seconds']:.1f}s, "
              f"{done[run.name]['tokens_per_s'] or 0:,.0f} tokens/s; {i + 1} of {len(all_runs)} runs "
              f"(planned {estimate:.0f}s in all)", flush=True)
    return done


# --- main -----------------------------------------------------------------------------------------------------------

def preflight(args: argparse.Namespace) -> str:
    """One line naming what is missing, before any work: the HF folder, the packages train.py needs, an accelerator
    for the full version. Returns the device's description."""
    import importlib.util

    if not (args.hf_dir / "config.json").is_file():
        raise SystemExit(f"gpu_experiment: error: --hf_dir {args.hf_dir}: no config.json (make it with "
                         "python -m models.convert gguf-to-hf --out DIR)")
    missing = [m for m in ("grain", "gin", "array_record", "orbax", "flax", "optax", "tokenizers")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"gpu_experiment: error: missing Python packages {missing} (requirements.txt)")
    import jax

    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__})"
    if jax.default_backend() == "cpu" and not (args.tiny or args.dry_run or args.prepare_only):
        raise SystemExit("gpu_experiment: error: the full version needs an accelerator (JAX sees only the CPU); "
                         "check it here with --dry_run or --tiny")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--hf_dir", type=pathlib.Path, required=True, help="SmolLM2-135M HF folder (gguf-to-hf)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=pathlib.Path, default=REPO / ".gpu_experiment",
                        help="prepared data and run folders")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results folder (default bench/results/gpu_experiment, WORK/results with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the same journey at a few steps and documents")
    parser.add_argument("--dry_run", action="store_true", help="plan and check every run; train nothing")
    parser.add_argument("--prepare_only", action="store_true", help="prepare the data (on a CPU machine) and stop")
    parser.add_argument("--assumed_mfu", type=float, default=ASSUMED_MFU)
    parser.add_argument("--n_boot", type=int, default=4000, help="bootstrap resamples per interval")
    args = parser.parse_args(argv)
    device = preflight(args)
    from trainer.metrics import PEAK_FLOPS

    scale = TINY if args.tiny else FULL
    work = args.work.resolve() / ("tiny" if args.tiny else "full")
    out = args.out or (work / "results" if args.tiny else REPO / "bench" / "results" / "gpu_experiment")
    hf_dir = args.hf_dir.resolve()
    tokens = prepare(scale, hf_dir, work, pretokenize=not args.dry_run)
    if args.prepare_only:
        print(f"prepared {work / 'prepared'}: corpus tokens {tokens}")
        return 0
    all_runs = runs(scale, args.seeds, hf_dir, work)
    p = plan(scale, args.seeds, all_runs, tokens, hf_dir, peak_flops=PEAK_FLOPS["h100"], mfu=args.assumed_mfu)
    print(f"device: {device}\n{format_plan(p)}", flush=True)
    if not p["dose_met"] and not args.tiny:
        print(f"gpu_experiment: error: a dosed run sees fewer than {DOSE:,} synthetic tokens", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    from bench.gpu_experiment_analysis import analyze, draw, summary_md

    timings = train_all(all_runs, work, p["estimated_seconds"])
    points = analyze(all_runs, work, scale, args.n_boot)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": device, "plan": p, "timings": timings,
                                                  "points": points}, indent=1) + "\n")
    (out / "summary.md").write_text(summary_md(points, p, timings, device))
    drawn = draw(points, out / "curve.png", scale.midtrain_steps)
    print((out / "summary.md").read_text() + f"\nresults: {out} ({'with' if drawn else 'without'} curve.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
