"""The durability pipeline's plan: every stage of every arm and seed with its steps, tokens, synthetic tokens, epochs
per document and the checks of its mixture and schedule (MixtureConfig.check_run, the warm-up), before anything
trains; `python -m experiments.durability FILE --dry_run` prints it with estimated wall times.

SFT stages start from exports that do not exist before their midtraining has run. Each is planned with a stand-in:
a folder with the network config and tokenizer the export will have (those of the stage that writes it), made in a
temporary folder the caller removes. So SFT steps come from the same data pipeline train.py will build for the
stage (durability.sample_schedule), with the tokenizer the export will carry.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import storage
from experiments import corpora, durability, estimate, plan as sweep_plan, priced
from experiments.durability import Config, Stage


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One train.py run of the pipeline. epochs: {what: epochs over it} (documents of the corpus, QA pairs,
    conversations); points: SFT samples at each evaluation point (SFT stages only); notes: what the stage will not
    do as configured."""
    name: str
    arm: str
    seed: int
    steps: int
    tokens: int
    synthetic_tokens: int
    epochs: dict[str, float]
    points: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


def load_stage(stage: Stage, init: str | None = None) -> Any:
    """The stage's RunConfig as train.py will load it, with INIT_FROM bound to `init` when given (a stand-in)."""
    from trainer import config as trainer_config

    bindings = stage.bindings + ("MODEL_DIR = 'unused'", f"TRAIN_STEPS = {stage.train_steps}")
    try:
        return trainer_config.load(stage.gin_files, bindings + ((f"INIT_FROM = {init!r}",) if init else ()))
    except trainer_config.ConfigError as e:
        raise ValueError(f"stage {stage.name}: {e}") from e


def stand_in(export: str, writer: Any, scratch: storage.Path) -> str:
    """`export` itself when it exists, else a folder under `scratch` with what it will hold for train.py's loading:
    config.json of the writing stage's network (`writer`, its RunConfig) and its tokenizer files."""
    from trainer import run_metadata

    if (storage.Path(export) / "config.json").is_file():
        return export
    folder = run_metadata.copy_tokenizer(writer.mixture.tokenizer, scratch / storage.Path(export).parent.name)
    (folder / "config.json").write_text(json.dumps(writer.model.to_hf(), indent=2) + "\n")
    return str(folder)


def _notes(name: str, run: Any, steps: int) -> tuple[str, ...]:
    try:
        return sweep_plan.run_notes(run, {}, steps)
    except ValueError as e:  # a share that gets no row in the stage
        raise ValueError(f"stage {name}: {e}") from None


def _tokens(run: Any, steps: int) -> int:
    return steps * run.train.batch_size * run.train.seq_len


def _midtrain(c: Config, arm: str, seed: int, stage: Stage) -> tuple[StagePlan, Any]:
    run = load_stage(stage)
    m = c.midtrain
    synth = m.get("share_component", str, "synthetic")
    share = run.mixture.weights.get(synth, 0.0)
    synthetic = round(share * _tokens(run, stage.train_steps))
    epochs = {}
    if share > 0:
        corpus = c.control if arm == "control" else c.document
        component = next(x for x in run.mixture.components if x.name == synth)
        _, corpus_tokens = corpora.count_tokens(corpus, component, run.mixture)
        epochs[f"{'control ' * (arm == 'control')}documents"] = synthetic / corpus_tokens
    return StagePlan(stage.name, arm, seed, stage.train_steps, _tokens(run, stage.train_steps), synthetic, epochs,
                     notes=_notes(stage.name, run, stage.train_steps)), run


def _read_epochs(run: Any, steps: int) -> dict[str, float]:
    """Epochs over each component of `steps` steps of the stage's data pipeline."""
    from data.pipeline import build

    pipe = build(run.mixture)
    for _ in range(steps):
        next(pipe.iterator)
    pipe.iterator.close()
    return {n: s["epochs"] for n, s in pipe.stats()["components"].items()}


def stages(c: Config, scratch: storage.Path) -> tuple[list[StagePlan], list[estimate.Planned]]:
    """Every stage in the order durability_run.run trains them, and the same as estimate.Planned. Raises ValueError
    naming the stage when its config does not load or a share gets no row in it."""
    out: list[tuple[StagePlan, Any]] = []
    for seed in c.seeds:
        pre = durability.pre_sft_stages(c, seed)
        written: dict[str, Any] = {}  # stage name -> RunConfig of the stage that writes its export
        for arm in ("base", "document", "control"):
            if pre[arm] is not None:
                planned, run = _midtrain(c, arm, seed, pre[arm])
                out.append((planned, run))
                written[pre[arm].name] = run
        qa, base = pre["instruction"], pre["base"]
        init = stand_in(qa.init_from, written[base.name], scratch) if base else qa.init_from
        run = load_stage(qa, init)
        out.append((StagePlan(qa.name, "instruction", seed, qa.train_steps, _tokens(run, qa.train_steps), 0,
                              {"QA pairs": _read_epochs(run, qa.train_steps)["sft"]},
                              notes=_notes(qa.name, run, qa.train_steps)), run))
        written[qa.name] = run
        for arm in c.arms:
            stage = pre[arm]
            init = durability.start_model(c, stage)
            if stage is not None:
                init = stand_in(init, written[stage.name], scratch)
            try:
                sft, sched = durability.scheduled_sft_stage(c, arm, seed, init)
            except ValueError as e:  # the stage's mixture cannot be built (e.g. a share below one row per block)
                raise ValueError(f"stage {arm}-sft-s{seed}: {e}") from None
            run = load_stage(sft)
            synthetic = sweep_plan.stage_tokens(list(run.mixture.weight_schedule()), "synthetic", sft.train_steps,
                                                _tokens(run, 1))
            epochs = {"conversations": sched.epochs["sft"]} | (
                {"documents": sched.epochs["synthetic"]} if "synthetic" in sched.epochs else {})
            out.append((StagePlan(sft.name, arm, seed, sft.train_steps, _tokens(run, sft.train_steps),
                                  sum(s[3] for s in synthetic), epochs, (0, *sched.samples),
                                  _notes(sft.name, run, sft.train_steps)), run))
    return [p for p, _ in out], [estimate.Planned(p.name, run, p.steps, c.run_dir(p.name)) for p, run in out]


def format_plan(c: Config, planned: list[StagePlan], est: estimate.Estimate | None) -> str:
    """The dry-run table: every stage with its budget, epochs and estimated time; warnings; the estimate's footer."""
    lines = [f"durability {c.path}: arms {', '.join(c.arms)} x seeds {list(c.seeds)}, {len(planned)} stages -> "
             f"{c.out_dir}",
             f"{'stage':<26} {'arm':<12} {'seed':>4} {'steps':>6} {'tokens':>10} {'synthetic_tokens':>17} "
             f"{'est_time':>9}{priced.cost_header(est)}  epochs; SFT samples at the evaluation points"]
    for p in planned:
        epochs = ", ".join(f"{v:.4f} {k}" for k, v in p.epochs.items()) or "-"
        points = f"; points {list(p.points)}" if p.points else ""
        lines.append(f"{p.name:<26} {p.arm:<12} {p.seed:>4} {p.steps:>6} {p.tokens:>10} {p.synthetic_tokens:>17} "
                     f"{estimate.duration(est.runs[p.name][1] if est else None):>9}{priced.cost_columns(est, p.name)}"
                     f"  {epochs}{points}")
    arms: dict[str, list[str]] = {}
    for p in planned:
        arms.setdefault(p.arm, []).append(p.name)
    lines += priced.arm_lines(est, arms)
    lines += [f"warning: {p.name}: {note}" for p in planned for note in p.notes]
    return "\n".join(lines + (est.lines() if est else []))
