"""A sweep file -> the list of runs: grid expansion, token budgets, deterministic names, train.py arguments.

Budget modes (per run, with tokens_per_step = BATCH_SIZE x SEQ_LEN token slots):
- fixed_total_tokens: every run trains `train_steps` steps; synthetic tokens = share x total, so the epochs per
  synthetic document grow with the share and shrink with the document count.
- fixed_synthetic_exposure: every document is seen `synthetic_epochs` times; a run trains the fewest steps whose
  synthetic tokens (share x total) reach synthetic_epochs x corpus tokens, so total tokens vary.
Schedules: `synthetic_from` (default [0.0]) lists when a run's synthetic documents start, each value crossed with
the shares: 0.0 (the whole run), a fraction of the run's steps in (0, 1) (0.8: the last 20%), or "decay" (the decay
phase of the learning-rate schedule: OptimizerConfig.schedule = 'warmup_stable_decay', its last decay_fraction of the
steps; trainer.optimizer.decay_start). Before that step the run reads replay only; from it on, `share` of its tokens
are synthetic, so the run's synthetic tokens are share x the tokens from that step on (the fixed_synthetic_exposure
budget lengthens the run until they reach its epochs). Such a run's MIXTURE_WEIGHTS is a schedule
[(0, {replay: 1, synthetic: 0}), (start, {replay: 1 - share, synthetic: share})] and its name ends in -fromSTART.
Token numbers are the mixture's nominal shares of the token slots (the pipeline lays its last mixture blocks out to
end with the run, so every run holds its shares as whole rows; a run whose rows hold a share more than 1% off gets a
warning, and a positive share that gets no row at all is an error; `python -m trainer.preview` measures them). Corpus
tokens are counted with the run's own tokenizer and document format. A share-0 run has no synthetic component, so it
does not depend on the corpus or document count: one share-0 run per (model, seed, steps) is the baseline of every
run with those.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import storage
from experiments import corpora
from experiments.settings import SettingsError, Table, read

BUDGETS = ("fixed_total_tokens", "fixed_synthetic_exposure")
TOP_KEYS = ("out_dir", "gin_file", "gin", "seeds", "shares", "doc_counts", "budget", "train_steps",
            "synthetic_epochs", "synthetic_from", "share_component", "replay_component", "corpus_macro", "corpora",
            "models", "eval")
EVAL_KEYS = ("pairs", "control_pairs", "heldout", "heldout_batches", "bootstrap", "batch_size", "anima_grader",
             "anima_epochs", "chat")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep and its token budget."""
    name: str
    model: str
    corpus: str | None          # None at share 0
    docs: int | None            # documents of the corpus used (None at share 0)
    share: float
    seed: int
    train_steps: int
    tokens_per_step: int
    total_tokens: int
    synthetic_tokens: int
    corpus_tokens: int | None
    epochs_per_doc: float | None
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    baseline: str | None        # the share-0 run of the same model, seed and steps, if the sweep has it
    notes: tuple[str, ...] = ()  # what the run will not do as configured (MixtureConfig.check_run, warm-up)
    synthetic_from: int = 0     # the step its synthetic documents start at (0: the whole run)
    stages: tuple[tuple[int, int, int, int], ...] = ()  # (first step, end step, tokens, synthetic tokens) per stage

    @property
    def arm(self) -> str:
        """The run's name without its seed: runs of one arm differ only by seed."""
        return self.name.rsplit("-s", 1)[0]


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: storage.Path
    out_dir: storage.Path  # local or gs://
    budget: str
    seeds: tuple[int, ...]
    shares: tuple[float, ...]
    share_component: str
    runs: tuple[Run, ...]
    eval: Table
    configs: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # model name -> RunConfig

    def run_dir(self, run: Run) -> storage.Path:
        return self.out_dir / "runs" / run.name


def _share_label(share: float) -> str:
    return f"{share:g}"


def corpus_binding(component: str, macro: str | None, path: str | pathlib.Path) -> str:
    """The gin binding that points the synthetic component at one corpus file: the config's own macro when it has
    one (runs/midtrain.gin: SYNTHETIC_FILES), else the component's paths. A share-0 run binds it too (the component
    is inactive at weight 0 and never read, but it must be valid)."""
    return f"{macro or f'{component}/Component.paths'} = ({str(path)!r},)"


def load(path: str | pathlib.Path) -> Sweep:
    """Reads and expands a sweep file; every problem is an error naming the file and key, before any training."""
    from trainer import config as trainer_config

    path = storage.Path(path)
    top = Table(read(path), str(path), TOP_KEYS)
    out_dir = storage.absolute(top.get("out_dir", str))
    seeds = top.get_list("seeds", int, nonempty=True)
    shares = top.get_list("shares", (int, float), nonempty=True)
    if any(not 0 <= s < 1 for s in shares) or len(set(shares)) != len(shares) or len(set(seeds)) != len(seeds):
        raise SettingsError(f"{path}: `shares` must be distinct numbers in [0, 1) and `seeds` distinct")
    doc_counts = top.get_list("doc_counts", int, []) or [None]
    if any(n is not None and n < 1 for n in doc_counts):
        raise SettingsError(f"{path}: `doc_counts` must be positive")
    budget = top.get("budget", str, "fixed_total_tokens")
    if budget not in BUDGETS:
        raise SettingsError(f"{path}: `budget` must be one of {list(BUDGETS)}, got {budget!r}")
    steps = top.get("train_steps", int, None)
    epochs = top.get("synthetic_epochs", (int, float), None)
    if budget == "fixed_total_tokens" and (steps is None or steps < 1):
        raise SettingsError(f"{path}: budget fixed_total_tokens needs a positive `train_steps`")
    if budget == "fixed_synthetic_exposure" and (epochs is None or epochs <= 0):
        raise SettingsError(f"{path}: budget fixed_synthetic_exposure needs a positive `synthetic_epochs`")
    starts = top.get_list("synthetic_from", (int, float, str), [0.0])
    if any(v != "decay" and (isinstance(v, str) or not 0 <= v < 1) for v in starts) or len(set(starts)) != len(starts):
        raise SettingsError(f"{path}: `synthetic_from` must list distinct fractions of the run's steps in [0, 1) or "
                            f"\"decay\", got {starts}")
    synth, replay = top.get("share_component", str, "synthetic"), top.get("replay_component", str, "replay")
    macro = top.get("corpus_macro", str, None)
    base_files, base_bindings = top.get_list("gin_file", str, nonempty=True), top.get_list("gin", str, [])
    corpus_table = top.table("corpora")
    if any(s > 0 for s in shares) and not corpus_table.data:
        raise SettingsError(f"{path}: shares above 0 need at least one entry in [corpora]")
    models = top.table("models").data or {"model": {}}
    corpus_dir = out_dir / "corpora"
    sources = {name: corpora.resolve(spec, corpus_dir, f"{corpus_table.where} `{name}`")
               for name, spec in corpus_table.data.items()}
    placeholder = corpus_binding(synth, macro, next(iter(sources.values()), "unused"))
    runs: list[Run] = []
    configs: dict[str, Any] = {}
    for model_name, model_spec in models.items():
        model = Table(model_spec, f"{path} [models.{model_name}]", ("gin_file", "gin"))
        files = tuple(base_files + model.get_list("gin_file", str, []))
        bindings = tuple(base_bindings + model.get_list("gin", str, []))
        try:
            # MODEL_DIR is set per run; a placeholder lets files that leave it unset load here.
            run_config = trainer_config.load(files, bindings + ("MODEL_DIR = 'unused'", placeholder))
        except trainer_config.ConfigError as e:
            raise SettingsError(f"{path} [models.{model_name}]: {e}") from e
        mixture = run_config.mixture
        names = [c.name for c in mixture.components]
        if synth not in names or replay not in names:
            raise SettingsError(f"{path}: share_component {synth!r} and replay_component {replay!r} must be "
                                f"components of the mixture, which has {names}")
        component = next(c for c in mixture.components if c.name == synth)
        configs[model_name] = run_config
        try:
            runs += _model_runs(model_name, files, bindings, run_config, component, sources, doc_counts, shares,
                                seeds, budget, steps, epochs, synth, replay, corpus_dir, macro, placeholder, starts)
        except SettingsError:
            raise
        except ValueError as e:  # a share the run's rows cannot hold (MixtureConfig.check_run)
            raise SettingsError(f"{path} [models.{model_name}]: {e}") from e
    return Sweep(path=path, out_dir=out_dir, budget=budget, seeds=tuple(seeds), shares=tuple(shares),
                 share_component=synth, runs=tuple(_link_baselines(runs)),
                 eval=top.table("eval", EVAL_KEYS), configs=configs)


def run_notes(run_config: Any, weights: Mapping[str, float] | list, steps: int) -> tuple[str, ...]:
    """What a run of `steps` steps at `weights` (its MIXTURE_WEIGHTS: a dict over the config's weights, or a schedule
    [(start step, dict), ...]) will not do as configured: shares its rows hold only approximately (a positive share
    that gets no row raises ValueError: MixtureConfig.check_run), a warm-up longer than the run."""
    from trainer.optimizer import warmup_note

    mixture, base = run_config.mixture, run_config.mixture.weights
    if isinstance(weights, Mapping):
        mixture = dataclasses.replace(mixture, weights={**base, **weights}, train_steps=steps)
    else:
        mixture = dataclasses.replace(mixture, weights=[(s, {**base, **w}) for s, w in weights], stages=(),
                                      train_steps=steps)
    return tuple(n for n in (mixture.check_run(), warmup_note(run_config.optimizer, steps)) if n)


def synthetic_start(value: float | str, steps: int, optimizer: Any) -> int:
    """The step a run of `steps` steps starts its synthetic documents at, for one `synthetic_from` value."""
    if value == "decay":
        from trainer.optimizer import decay_start

        return decay_start(optimizer, steps)
    return round(value * steps)


def synthetic_weights(replay: str, synth: str, share: float, start: int) -> dict[str, float] | list:
    """MIXTURE_WEIGHTS of a run whose synthetic documents are `share` of its tokens from step `start` on."""
    weights = {replay: 1 - share, synth: share}
    return weights if start == 0 else [(0, {replay: 1.0, synth: 0.0}), (start, weights)]


def _exposure_steps(value: float | str, share: float, tokens_per_step: int, needed: float, optimizer: Any) -> int:
    """The fewest steps whose synthetic tokens (share x the tokens from the synthetic start on) reach `needed`: the
    window (steps - start) never shrinks as a run grows, so search from the estimate."""
    window = lambda n: n - synthetic_start(value, n, optimizer)  # noqa: E731
    fraction = optimizer.decay_fraction if value == "decay" else value
    steps = max(math.ceil(needed / (share * tokens_per_step * (1 - fraction))), 1)
    while steps > 1 and share * tokens_per_step * window(steps - 1) >= needed:
        steps -= 1
    while share * tokens_per_step * window(steps) < needed:
        steps += 1
    return steps


def stage_tokens(weights: dict[str, float] | list, synth: str, steps: int, tokens_per_step: int
                 ) -> tuple[tuple[int, int, int, int], ...]:
    """(first step, end step, tokens, synthetic tokens) of every stage of a run's MIXTURE_WEIGHTS."""
    schedule = [(0, weights)] if isinstance(weights, Mapping) else weights
    ends = [start for start, _ in schedule[1:]] + [steps]
    return tuple((start, end, (end - start) * tokens_per_step,
                  round(w.get(synth, 0.0) * (end - start) * tokens_per_step))
                 for (start, w), end in zip(schedule, ends))


def _model_runs(model_name, files, bindings, run_config, component, sources, doc_counts, shares, seeds, budget,
                steps, epochs, synth, replay, corpus_dir, macro, placeholder, starts) -> list[Run]:
    mixture, optimizer = run_config.mixture, run_config.optimizer
    tokens_per_step = run_config.train.batch_size * run_config.train.seq_len
    runs, baselines = [], set()
    for corpus_name, source in sources.items():
        for docs in doc_counts:
            path = corpora.first_documents(source, docs, corpus_dir, corpus_name)
            n_docs, corpus_tokens = corpora.count_tokens(path, dataclasses.replace(component, paths=(str(path),)),
                                                         mixture)
            for share, value in ((s, v) for s in shares if s > 0 for v in starts):
                run_steps = steps if budget == "fixed_total_tokens" else \
                    _exposure_steps(value, share, tokens_per_step, epochs * corpus_tokens, optimizer)
                arm = f"{model_name}-{corpus_name}-n{n_docs}-w{_share_label(share)}-t{run_steps}"
                try:
                    start = synthetic_start(value, run_steps, optimizer)
                    weights = synthetic_weights(replay, synth, share, start)
                    notes = run_notes(run_config, weights, run_steps)
                except ValueError as e:
                    raise ValueError(f"runs {arm}-s*: {e}") from None
                arm += f"-from{start}" if start else ""
                stages = stage_tokens(weights, synth, run_steps, tokens_per_step)
                synthetic = sum(s[3] for s in stages)
                run_bindings = bindings + (f"MIXTURE_WEIGHTS = {weights!r}", corpus_binding(synth, macro, path))
                for seed in seeds:
                    runs.append(Run(f"{arm}-s{seed}", model_name, corpus_name, n_docs, share, seed, run_steps,
                                    tokens_per_step, run_steps * tokens_per_step, synthetic, corpus_tokens,
                                    share * (run_steps - start) * tokens_per_step / corpus_tokens, files,
                                    run_bindings, None, notes, start, stages))
                if 0 in shares:
                    baselines.add(run_steps)
    if 0 in shares and budget == "fixed_total_tokens":
        baselines.add(steps)
    for run_steps in sorted(baselines):
        weights = {replay: 1.0, synth: 0.0}
        notes = run_notes(run_config, weights, run_steps)
        for seed in seeds:
            runs.append(Run(f"{model_name}-base-t{run_steps}-s{seed}", model_name, None, None, 0.0, seed, run_steps,
                            tokens_per_step, run_steps * tokens_per_step, 0, None, None, files,
                            bindings + (f"MIXTURE_WEIGHTS = {weights!r}", placeholder), None, notes, 0,
                            stage_tokens(weights, synth, run_steps, tokens_per_step)))
    return runs


def _link_baselines(runs: list[Run]) -> list[Run]:
    names = {r.name for r in runs}
    out = []
    for r in runs:
        base = f"{r.model}-base-t{r.train_steps}-s{r.seed}"
        out.append(dataclasses.replace(r, baseline=base if r.share > 0 and base in names else None))
    return out


def train_args(sweep: Sweep, run: Run) -> list[str]:
    """train.py's arguments for a run (gin files, the sweep's bindings, then the run's own macros, which win)."""
    return ([f"--gin_file={f}" for f in run.gin_files]
            + [f"--gin_bindings={b}" for b in run.bindings]
            + [f"--gin_bindings=MODEL_DIR = {str(sweep.run_dir(run))!r}",
               f"--gin_bindings=TRAIN_STEPS = {run.train_steps}", f"--gin_bindings=SEED = {run.seed}"])


def planned(sweep: Sweep) -> list[Any]:
    """Every run as experiments.estimate plans it (its model's RunConfig, steps and run directory)."""
    from experiments import estimate

    return [estimate.Planned(r.name, sweep.configs[r.model], r.train_steps, sweep.run_dir(r)) for r in sweep.runs]


def format_plan(sweep: Sweep, est: Any = None) -> str:
    """The dry-run table: every run with its token budget, synthetic tokens, epochs per document and, given an
    experiments.estimate.Estimate, its estimated wall time (and the estimate's footer)."""
    from experiments.estimate import duration
    from experiments.priced import arm_lines, cost_columns, cost_header

    header = (f"{'run':<44} {'share':>6} {'docs':>6} {'seed':>5} {'steps':>7} {'total_tokens':>13} "
              f"{'synthetic_tokens':>17} {'corpus_tokens':>14} {'epochs_per_doc':>15} {'est_time':>9}"
              f"{cost_header(est)}  baseline")
    lines = [f"sweep {sweep.path} ({sweep.budget}): {len(sweep.runs)} runs -> {sweep.out_dir}", header]
    for r in sweep.runs:
        seconds = est.runs[r.name][1] if est else None
        lines.append(f"{r.name:<44} {r.share:>6g} {r.docs if r.docs is not None else '-':>6} {r.seed:>5} "
                     f"{r.train_steps:>7} {r.total_tokens:>13} {r.synthetic_tokens:>17} "
                     f"{r.corpus_tokens if r.corpus_tokens is not None else '-':>14} "
                     f"{f'{r.epochs_per_doc:.4f}' if r.epochs_per_doc is not None else '-':>15} "
                     f"{duration(seconds):>9}{cost_columns(est, r.name)}  {r.baseline or '-'}")
        if len(r.stages) > 1:
            lines += [f"{'':<4}stage from step {start}: steps {start}-{end - 1}, {tokens} tokens, {synthetic} synthetic"
                      for start, end, tokens, synthetic in r.stages]
    arms: dict[str, list[str]] = {}
    for r in sweep.runs:
        arms.setdefault(r.arm, []).append(r.name)
    lines += arm_lines(est, arms)
    notes = {r.arm: r.notes for r in sweep.runs if r.notes}
    lines += [f"warning: {arm}-s*: {note}" for arm, arm_notes in notes.items() for note in arm_notes]
    return "\n".join(lines + (est.lines() if est else []))


def as_dict(run: Run, est: Any = None) -> dict[str, Any]:
    """A run as JSON, with its estimated seconds and config shape when an estimate is given (and its chip-hours and
    USD on demand and Spot when it is priced)."""
    out = dataclasses.asdict(run)
    if est:
        out["step_time_shape"], out["estimated_seconds"] = est.runs[run.name]
        cost = est.cost(run.name)
        if cost is not None:
            out["chip_hours"], out["on_demand_usd"], out["spot_usd"] = cost
    return out
