"""The durability pipeline: midtrain -> general instruction tuning for N samples, evaluated every k samples, for
several arms side by side, and one report with the decay curves. One config, one command:

    python -m experiments.durability sweeps/durability_demo.toml --dry_run   # every stage, its budget and time
    python -m experiments.durability sweeps/durability_demo.toml --dry_run --topology=v5p:2x2x1   # and its cost
    python -m experiments.durability sweeps/durability_demo.toml

Arms (each with every seed of the file):
- base: the untouched base model (`[midtrain] base_model`), or, for models trained from scratch (the demo), the
  share-0 midtraining run (replay only, same steps);
- document: midtrained with the document corpus at `[midtrain] share`;
- control: midtrained with the matched control corpus at the same share;
- instruction: the base arm, instruction-tuned on QA pairs of the same spec (`[instruction]`, `data.synth qa`);
- preservation (when `[sft] preservation_share` is above 0 anywhere): the document arm, whose later SFT keeps
  synthetic documents in its mixture (t5x_configs/mixtures/sft_with_synthetic.gin) by a schedule: its MIXTURE_WEIGHTS
  is [(start step, {'sft': 1 - p, 'synthetic': p}), ...], from `preservation_share` = p (the whole SFT) or
  [[fraction, p], ...] (from that fraction of the SFT's steps on p, the first at 0.0; [[0.0, 0.1], [0.5, 0.0]]
  keeps 10% documents in the first half only).
Then every arm is fine-tuned on the general instruction data (`[sft]`), its probes scored every `eval_every` samples
(converted to steps by replaying the SFT data pipeline, which counts the conversations each step starts; the curve's
x values are the base arm's measured counts at each point) and at its start. By default the points are the SFT run's
in-loop probes (TrainConfig.probe_sets, trainer.probes_in_loop: the live parameters, no export, no disk); with
`[sft] points = "exports"` each point is an HF export (parameters only, in the stage's CheckpointConfig.export_dtype)
scored by eval.probes, as ANIMA (`[eval] anima_grader`) needs. With `[midtrain] probe_every`, the stages before the
SFT (midtraining, the QA tuning) log in-loop probes too, so each arm's margin is followed from its base model through
midtraining and SFT. The report plots each arm's margin and its shift against the base arm at the same point (paired
by seed, minus the neutral set's shift) against SFT samples, with CIs, and the in-loop margins against training
steps. Finished stages are skipped and interrupted ones resume, as in sweep.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import pathlib
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import exit_codes
import storage
from experiments import corpora
from experiments.evaluate import EvalSettings, settings
from experiments.plan import corpus_binding
from experiments.settings import SettingsError, Table, read

PROG = "python -m experiments.durability"
TOP_KEYS = ("out_dir", "seeds", "midtrain", "instruction", "sft", "eval")
MIDTRAIN_KEYS = ("gin_file", "gin", "train_steps", "share", "share_component", "replay_component", "corpus_macro",
                 "document_corpus", "control_corpus", "base_model", "probe_every")
STAGE_KEYS = ("gin_file", "gin", "train_steps", "data", "format", "samples", "eval_every", "preservation_share",
              "points")
POINTS = ("in_loop", "exports")
ARMS = ("base", "document", "control", "instruction", "preservation")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One train.py run of an arm: its name, gin files and bindings, and the stage it starts from (None: as configured)."""
    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    train_steps: int
    init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    path: storage.Path
    out_dir: storage.Path  # local or gs://
    seeds: tuple[int, ...]
    midtrain: Table
    instruction: Table
    sft: Table
    eval: EvalSettings
    document: storage.Path
    control: storage.Path
    qa: storage.Path
    sft_data: storage.Path

    preservation: tuple[tuple[float, float], ...] = ()  # ((fraction of the SFT's steps, synthetic share), ...)

    @property
    def arms(self) -> tuple[str, ...]:
        return ARMS if any(p > 0 for _, p in self.preservation) else ARMS[:-1]

    @property
    def in_loop(self) -> bool:
        """The SFT curve's points are in-loop probes (no exports)."""
        return self.sft.get("points", str, "in_loop") == "in_loop"

    def run_dir(self, name: str) -> storage.Path:
        return self.out_dir / "runs" / name


def load(path: str | pathlib.Path) -> Config:
    path = storage.Path(path)
    top = Table(read(path), str(path), TOP_KEYS)
    out_dir = storage.absolute(top.get("out_dir", str))
    mid, ins, sft = top.table("midtrain", MIDTRAIN_KEYS), top.table("instruction", STAGE_KEYS), \
        top.table("sft", STAGE_KEYS)
    share = mid.get("share", (int, float))
    if not 0 < share < 1:
        raise SettingsError(f"{path}: [midtrain] share must be in (0, 1)")
    preservation = _preservation(sft)
    samples, every = sft.get("samples", int), sft.get("eval_every", int)
    if not 0 < every <= samples:
        raise SettingsError(f"{path} [sft]: need 0 < eval_every <= samples, got {every} and {samples}")
    if sft.get("points", str, "in_loop") not in POINTS:
        raise SettingsError(f"{path} [sft]: `points` must be one of {list(POINTS)}, got {sft.get('points', str)!r}")
    if mid.get("probe_every", int, 1) < 1:
        raise SettingsError(f"{path} [midtrain]: `probe_every` must be >= 1")
    folder = out_dir / "corpora"
    resolve = lambda t, key: corpora.resolve(t.get(key, (str, dict)), folder, f"{t.where} `{key}`")  # noqa: E731
    seeds = top.get_list("seeds", int, nonempty=True)
    evaluation = settings(top.table("eval"))
    if evaluation.anima_grader and sft.get("points", str, "in_loop") == "in_loop":
        raise SettingsError(f"{path}: [eval] anima_grader scores HF exports; set [sft] points = \"exports\"")
    return Config(path, out_dir, tuple(seeds), mid, ins, sft, evaluation,
                  resolve(mid, "document_corpus"), resolve(mid, "control_corpus"), resolve(ins, "data"),
                  resolve(sft, "data"), preservation)


def _preservation(sft: Table) -> tuple[tuple[float, float], ...]:
    """`[sft] preservation_share` as ((fraction of the SFT's steps, share), ...): a number p is ((0.0, p),)."""
    value = sft.get("preservation_share", (int, float, list), 0)
    stages = value if isinstance(value, list) else [[0.0, value]]
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1  # noqa: E731
    ok = bool(stages) and all(isinstance(s, list) and len(s) == 2 and number(s[0]) and number(s[1]) for s in stages)
    fractions = [s[0] for s in stages] if ok else []
    if not ok or fractions[0] != 0 or fractions != sorted(set(fractions)):
        raise SettingsError(f"{sft.where}: `preservation_share` must be a share in [0, 1) or a schedule "
                            f"[[fraction of the SFT's steps, share], ...] starting at 0.0 with increasing fractions "
                            f"in [0, 1), got {value!r}")
    return tuple((float(f), float(p)) for f, p in stages)


def preservation_weights(c: Config, steps: int) -> list[tuple[int, dict[str, float]]]:
    """The preservation arm's SFT MIXTURE_WEIGHTS for a run of `steps` steps: each stage from round(fraction x
    steps) on (a stage that starts where a later one does, or at or after the run's end, never applies: dropped)."""
    starts = [round(f * steps) for f, _ in c.preservation]
    return [(start, {"sft": 1 - p, "synthetic": p}) for i, (start, (_, p)) in enumerate(zip(starts, c.preservation))
            if start < steps and (i + 1 == len(starts) or starts[i + 1] > start)]


def _midtrain_stage(c: Config, arm: str, seed: int) -> Stage:
    m = c.midtrain
    synth, replay = m.get("share_component", str, "synthetic"), m.get("replay_component", str, "replay")
    share = 0.0 if arm == "base" else m.get("share", (int, float))
    corpus = c.control if arm == "control" else c.document  # the base arm's is inactive (weight 0), never read
    bindings = [f"MIXTURE_WEIGHTS = {({replay: 1 - share, synth: share})!r}", f"SEED = {seed}",
                corpus_binding(synth, m.get("corpus_macro", str, None), corpus)]
    base = m.get("base_model", str, "")
    if base:
        bindings.append(f"INIT_FROM = {base!r}")
    return Stage(f"{arm}-midtrain-s{seed}", tuple(m.get_list("gin_file", str, nonempty=True)),
                 tuple(m.get_list("gin", str, []) + bindings) + _pre_sft_probes(c), m.get("train_steps", int))


def _pre_sft_probes(c: Config) -> tuple[str, ...]:
    """In-loop probe bindings of the stages before the general SFT (`[midtrain] probe_every`; none without it)."""
    every = c.midtrain.get("probe_every", int, 0)
    return c.eval.probe_bindings(every) if every else ()


def _sft_stage(c: Config, table: Table, name: str, init: str, data: storage.Path, steps: int,
               extra: tuple[str, ...] = (), extra_files: tuple[str, ...] = ()) -> Stage:
    bindings = (f"INIT_FROM = {init!r}", f"SFT_FILES = ({str(data)!r},)",
                f"SFT_FORMAT = {table.get('format', str, 'chat')!r}")
    return Stage(name, tuple(table.get_list("gin_file", str, nonempty=True)) + extra_files,
                 tuple(table.get_list("gin", str, [])) + bindings + extra, steps, init)


def _hf(c: Config, name: str) -> str:
    return str(c.run_dir(name) / "hf")


@dataclasses.dataclass(frozen=True)
class SampleSchedule:
    """An SFT stage's evaluation points: steps between them, their steps (the last one ends the run), the
    conversations of the SFT component started by each, and every component's epochs over the run."""
    steps_per_eval: int
    steps: list[int]
    samples: list[int]
    epochs: dict[str, float]


def sample_schedule(c: Config, stage: Callable[[int], Stage], component: str = "sft") -> SampleSchedule:
    """The evaluation points of an SFT stage (`stage(n)`: the stage as a run of n steps; its mixture schedule may
    depend on n), from the same data pipeline train.py builds for it (same config, tokenizer, seed). Checkpoints are
    evenly spaced (train.py checkpoints every CHECKPOINT_EVERY steps): every = the first step by which `eval_every`
    conversations have started; the run ends at the first step by which `samples` have, which is also the last
    point. The counts are those of the run's own layout (its mixture stages at their steps, its last mixture blocks
    ending with the run: MixtureConfig.train_steps)."""
    from data.pipeline import build
    from trainer import config as trainer_config

    samples, every = c.sft.get("samples", int), c.sft.get("eval_every", int)

    def started(steps: int | None) -> tuple[list[int], dict[str, Any]]:
        """Conversations started by each step of a run of `steps` steps (None: open-ended, until `samples`, at the
        first stage's weights)."""
        s = stage(steps or 1)
        mixture = trainer_config.load(s.gin_files, s.bindings + ("MODEL_DIR = 'unused'",)).mixture
        pipe = build(dataclasses.replace(mixture, train_steps=steps, allow_unrealized_shares=True))  # counting only
        counts: list[int] = []
        while len(counts) < steps if steps else not counts or counts[-1] < samples:
            next(pipe.iterator)  # the SFT component repeats, so the stream does not end
            counts.append(pipe.stats()["components"][component]["documents"])
        pipe.iterator.close()
        return counts, pipe.stats()

    run_steps = len(started(None)[0])
    counts, stats = started(run_steps)
    while counts[-1] < samples:  # the run's own last blocks may start fewer conversations than an open-ended layout
        run_steps += 1
        counts, stats = started(run_steps)
    while run_steps > 1 and (shorter := started(run_steps - 1))[0][-1] >= samples:  # later stages with more of it
        run_steps -= 1
        counts, stats = shorter
    per_eval = next(i + 1 for i, n in enumerate(counts) if n >= every)
    steps = [s for s in range(per_eval, len(counts), per_eval)] + [len(counts)]
    return SampleSchedule(per_eval, steps, [counts[s - 1] for s in steps],
                          {n: s["epochs"] for n, s in stats["components"].items()})


def pre_sft_stages(c: Config, seed: int) -> dict[str, Stage | None]:
    """The stages that make each arm before the general SFT (None: the untouched base model)."""
    base_model = c.midtrain.get("base_model", str, "")
    stages: dict[str, Stage | None] = {"base": None if base_model else _midtrain_stage(c, "base", seed),
                                       "document": _midtrain_stage(c, "document", seed),
                                       "control": _midtrain_stage(c, "control", seed)}
    base_init = base_model or _hf(c, stages["base"].name)
    stages["instruction"] = _sft_stage(c, c.instruction, f"instruction-qa-s{seed}", base_init, c.qa,
                                       c.instruction.get("train_steps", int), (f"SEED = {seed}", *_pre_sft_probes(c)))
    if "preservation" in c.arms:
        stages["preservation"] = stages["document"]
    return stages


def history(c: Config, arm: str, seed: int) -> list[tuple[str, int]]:
    """(run name, steps) of every stage that trained an arm's model, in order, its general SFT last (its steps not
    needed: nothing comes after it): the base arm's midtraining comes before the instruction arm's QA tuning."""
    pre = pre_sft_stages(c, seed)
    chain = {"instruction": [pre["base"], pre["instruction"]]}.get(arm, [pre[arm]])
    return [(s.name, s.train_steps) for s in chain if s is not None] + [(f"{arm}-sft-s{seed}", 0)]


def start_model(c: Config, stage: Stage | None) -> str:
    """The HF folder an arm's SFT starts from, also its point before SFT: the base model or the stage's export."""
    return c.midtrain.get("base_model", str) if stage is None else _hf(c, stage.name)


def sft_stage(c: Config, arm: str, seed: int, init: str, steps: int) -> Stage:
    """An arm's general SFT as a run of `steps` steps (the preservation arm's mixture schedule is laid out on them)."""
    extra: tuple[str, ...] = (f"SEED = {seed}",)
    files: tuple[str, ...] = ()
    if arm == "preservation":
        files = ("mixtures/sft_with_synthetic.gin",)
        extra += (f"MIXTURE_WEIGHTS = {preservation_weights(c, steps)!r}", f"SYNTHETIC_FILES = ({str(c.document)!r},)")
    return _sft_stage(c, c.sft, f"{arm}-sft-s{seed}", init, c.sft_data, steps, extra, files)


def scheduled_sft_stage(c: Config, arm: str, seed: int, init: str) -> tuple[Stage, SampleSchedule]:
    """An arm's general SFT stage, run to its last evaluation point, and its schedule; with in-loop points the stage
    scores the probes at its start and at every point."""
    make = functools.partial(sft_stage, c, arm, seed, init)
    sched = sample_schedule(c, make)
    stage = make(sched.steps[-1])
    probes = c.eval.probe_bindings(sched.steps_per_eval) if c.in_loop else ()
    return dataclasses.replace(stage, bindings=stage.bindings + probes), sched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.durability", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="durability config (TOML)")
    parser.add_argument("--launcher", help="command template for each stage, as in sweep.py")
    parser.add_argument("--dry_run", action="store_true",
                        help="print every stage with its steps, tokens, synthetic tokens, epochs and estimated wall "
                             "time; train nothing")
    from experiments import durability_plan, priced
    from launch import topology

    priced.add_flags(parser)
    args = parser.parse_args(argv)
    priced.check_flags(parser, args)
    missing = args.topology and topology.libtpu_missing("--topology needs")
    if missing:
        return exit_codes.report(missing, PROG)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)

    try:
        priced.price(args)  # a price table or region that does not hold, before any work
        c = load(args.config)
        with tempfile.TemporaryDirectory(prefix="docmix-plan-") as scratch:  # stand-ins for exports not made yet
            planned, runs = durability_plan.stages(c, storage.Path(scratch))
            est = priced.from_flags(runs, args, progress=lambda line: print(line, file=sys.stderr, flush=True)) \
                if args.dry_run else None
    except ValueError as e:  # SettingsError, or a stage whose config or shares do not hold (before any training)
        return exit_codes.report(e, PROG)
    if args.dry_run:
        print(durability_plan.format_plan(c, planned, est))
        return 0
    for p in planned:
        for note in p.notes:
            print(f"warning: {p.name}: {note}", file=sys.stderr)
    from experiments import durability_report, durability_run

    done = durability_run.run(c, args.launcher)
    s = dataclasses.replace(c.eval, heldout=False)  # SFT points' held-out loss: run eval.heldout on their exports
    results = durability_run.evaluate_points(c, done["points"], s, done["status"])
    est = priced.from_flags(runs, args)  # each stage's estimate beside its goodput.json
    report = durability_report.write(c, done["points"], results, done["status"], s, c.out_dir / "report", est)
    print(f"\n{report['note']}\nreport: {c.out_dir / 'report' / 'report.md'}")
    missing = [n for n, st in done["status"].items() if st["status"] != "done"]
    if missing:
        return exit_codes.report(exit_codes.Failed(
            exit_codes.STOPPED, f"{len(missing)} stage(s) did not finish ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}; their logs: {c.out_dir / 'logs'}); rerun the same command to "
            "resume them"), PROG)
    return 0


if __name__ == "__main__":
    import host_memory

    host_memory.use_huge_pages()
    sys.exit(exit_codes.run(main, PROG))
