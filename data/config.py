"""Mixture configuration: components, token-share weights, stages, packing and tokenizer policy.

Both dataclasses are frozen and validate themselves in `__post_init__`; every error names the field or component
so that a bad gin binding (`--gin.MIXTURE_WEIGHTS=...`) fails before anything is read or compiled.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from data.blocks import block_rows, stretch_rows

log = logging.getLogger(__name__)

SOURCE_KINDS = ("jsonl", "parquet", "array_record", "tfds", "hf_disk", "seqio", "pretokenized")
FORMATS = ("text", "chat", "alpaca")
PACKINGS = ("concat_then_split", "first_fit")
ON_EXHAUSTED = ("stop", "error")


@dataclasses.dataclass(frozen=True)
class Component:
    """One named mixture component: where its documents are and how they become training tokens.

    kind: one of SOURCE_KINDS. `paths` are files or globs (local or any `etils.epath` URL) for jsonl (.jsonl/.jsonl.gz),
      parquet, array_record and pretokenized; a `save_to_disk` folder for hf_disk. `dataset` names the TFDS dataset
      (with `split`, `data_dir`) or the seqio Task/Mixture (with `split`).
    text_field: record field holding the document text (format "text").
    format: "text" (one document per record), "chat" (`messages` list, chat template) or "alpaca"
      (`instruction`/`input`/`output`, chat template); chat/alpaca train only on assistant tokens.
    prefix: text put before every document (e.g. "<DOCTAG>"); its tokens are never loss targets.
    loss_weight: weight of this component's target tokens in `loss_mask`.
    max_epochs: cap on passes over the documents (None = repeat forever); `on_exhausted` says what happens past it:
      "stop" ends the pipeline (StopIteration), "error" raises `data.mixture.ComponentExhausted`.
    packing: "concat_then_split" (no padding, documents split at row ends) or "first_fit" (whole documents packed
      into rows, documents longer than seq_len split into consecutive chunks; `packing_bins` open rows).
    truncate: keep only the first seq_len tokens of each document instead of splitting it.
    """

    name: str
    kind: str = "jsonl"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    format: str = "text"
    prefix: str = ""
    loss_weight: float = 1.0
    max_epochs: int | None = None
    on_exhausted: str = "stop"
    packing: str = "concat_then_split"
    packing_bins: int = 16
    truncate: bool = False
    shuffle: bool = True
    dataset: str = ""
    split: str = "train"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        where = f"Component {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Component name must be an identifier-like string, got {self.name!r}")
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        _choice(where, "kind", self.kind, SOURCE_KINDS)
        _choice(where, "format", self.format, FORMATS)
        _choice(where, "packing", self.packing, PACKINGS)
        _choice(where, "on_exhausted", self.on_exhausted, ON_EXHAUSTED)
        if self.kind in ("tfds", "seqio"):
            if not self.dataset:
                raise ValueError(f"{where}: kind={self.kind!r} needs `dataset` (the TFDS name or seqio Task/Mixture)")
        elif not self.paths:
            raise ValueError(f"{where}: kind={self.kind!r} needs at least one entry in `paths`")
        if self.kind == "pretokenized" and (self.format != "text" or self.prefix):
            raise ValueError(f"{where}: a pretokenized component was rendered at pretokenize time; "
                             "set format/prefix when running trainer.pretokenize, not here")
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise ValueError(f"{where}: loss_weight must be a finite number >= 0, got {self.loss_weight!r}")
        if self.max_epochs is not None and (not isinstance(self.max_epochs, int) or self.max_epochs < 1):
            raise ValueError(f"{where}: max_epochs must be None or an int >= 1, got {self.max_epochs!r}")
        if self.packing_bins < 1:
            raise ValueError(f"{where}: packing_bins must be >= 1, got {self.packing_bins}")


def _choice(where: str, field: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: {field}={value!r} is not one of {list(allowed)}")


def _split_schedule(weights: Any, stages: Sequence[Any]) -> tuple[Any, list[tuple[int, Any]], str]:
    """(the first stage's weights, [(index, later stage), ...], the field the indices refer to) of `weights` given as
    a dict (its stages are `stages`) or as a schedule [(0, weights), (start_step, weights), ...]."""
    if isinstance(weights, Mapping):
        return weights, list(enumerate(stages)), "stages"
    if isinstance(weights, str) or not isinstance(weights, Sequence) or not weights:
        raise ValueError("MixtureConfig.weights must be a dict from component name to token share, or a schedule "
                         f"[(0, {{...}}), (start_step, {{...}}), ...], got {weights!r}")
    if stages:
        raise ValueError("MixtureConfig.weights is a schedule and MixtureConfig.stages is set too; give the stages "
                         "in one place")
    first = weights[0]
    if not (isinstance(first, Sequence) and len(first) == 2 and first[0] == 0 and not isinstance(first[0], bool)):
        raise ValueError(f"MixtureConfig.weights[0]: a schedule's first stage is (0, weights), got {first!r}")
    return first[1], list(enumerate(weights))[1:], "weights"


def normalize_weights(weights: Mapping[str, float], names: Sequence[str], field: str = "weights") -> dict[str, float]:
    """Validates token-share weights over the component `names` and returns them normalized to sum to 1.

    Zero weights are kept (as 0.0) so the caller can drop the component; missing, unknown, negative, NaN and all-zero
    weights are errors naming the component.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"MixtureConfig.{field} must be a dict from component name to token share, got {weights!r}")
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise ValueError(f"MixtureConfig.{field}: unknown component(s) {unknown}; components are {list(names)}")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"MixtureConfig.{field}: no weight for component(s) {missing} (give weight 0 to drop one)")
    values = {}
    for name in names:
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"MixtureConfig.{field}[{name!r}] must be a finite number >= 0, got {w!r}")
        values[name] = float(w)
    total = sum(values.values())
    if total <= 0:
        raise ValueError(f"MixtureConfig.{field}: all weights are zero; at least one component needs a positive share")
    if abs(total - 1.0) > 1e-6:
        log.warning("MixtureConfig.%s sum to %g, not 1; normalizing to token shares %s", field, total,
                    {k: v / total for k, v in values.items()})
    return {k: v / total for k, v in values.items()}


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """Everything the data pipeline needs; `data.pipeline.build(config)` turns it into batches.

    weights: component name -> share of training TOKENS (normalized; 0 removes the component), or a schedule
      [(0, weights), (start_step, weights), ...] (what `--gin.MIXTURE_WEIGHTS=[...]` binds): its first stage becomes
      `weights`, the others `stages`.
    stages: ((start_step, weights), ...): from training step `start_step` on, these weights apply. A stage may start at
      any step: blocks are laid out from each stage's first row and the previous stage's last block ends there, so
      every stage holds its shares as whole rows of its own (exactly when share x the stage's rows per data shard is
      a whole number, else within one row per component; data.blocks). A start on a block boundary leaves the
      previous stage's blocks whole.
    seq_len: row length in tokens; batch_size: GLOBAL batch in rows (all processes together).
    block_size: rows per mixture block; in each block every component gets exactly its largest-remainder share. When
      some share is not a whole number of block_size rows, a stage uses the smallest block in which all are, if one
      is smaller (data.blocks).
    train_steps: the run's length in optimizer steps (base.gin binds TRAIN_STEPS; None: open-ended). The last stage's
      blocks end with the run, so the run's rows hold every share as whole rows whatever its length, a run shorter
      than one block included.
    allow_unrealized_shares: accept a run in which a component with a positive share gets no row (a share too small
      for the run's rows); otherwise that is an error before anything is read (`check_run`).
    tokenizer: a tokenizer.json file or a folder with tokenizer.json (+ tokenizer_config.json, chat template).
    add_bos/add_eos: None = the tokenizer's own policy (see data.tokenize); bos_token/eos_token override the tokens.
    max_bad_records: per component, malformed records skipped (and reported) before the run stops with an error.
    max_document_bytes: a record larger than this (a JSONL line's bytes, found without reading the line whole; for
      other sources the UTF-8 bytes of its text) is a bad record: skipped and reported like a malformed one, so one
      huge document (a file without newlines) neither stalls a step nor fills memory while it is tokenized.
    num_shards: data shards. Each shard is packed and mixed independently and fills batch_size/num_shards contiguous
      rows of every global batch; the global stream depends on the shard count only, so a run resumes with the same
      data order on any number of processes that divides it. None = `default_num_shards(batch_size)` (raised to a
      multiple of the process count where that does not divide it).
    worker_count: Grain worker processes per JAX process (0 = in-process).
    prefetch: batches a background thread prepares ahead of the training loop (0 = none), so tokenizing and packing
      overlap the train step. The iterator's state (what checkpoints save) stays the position after the batches
      handed out, not the ones prepared ahead.
    """

    components: tuple[Component, ...]
    weights: Mapping[str, float]
    tokenizer: str
    seq_len: int = 1024
    batch_size: int = 8
    seed: int = 0
    block_size: int = 1024
    train_steps: int | None = None
    allow_unrealized_shares: bool = False
    stages: tuple[tuple[int, Mapping[str, float]], ...] = ()
    add_bos: bool | None = None
    add_eos: bool | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    max_bad_records: int = 100
    max_document_bytes: int = 4 << 20
    num_shards: int | None = None
    worker_count: int = 0
    prefetch: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", tuple(self.components))
        if not self.components:
            raise ValueError("MixtureConfig.components is empty")
        for c in self.components:
            if not isinstance(c, Component):
                raise ValueError(f"MixtureConfig.components must hold data.config.Component, got {c!r}")
        names = [c.name for c in self.components]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"MixtureConfig.components: duplicate component name(s) {dups}")
        for field in ("seq_len", "batch_size", "block_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MixtureConfig.{field} must be a positive int, got {value!r}")
        if self.train_steps is not None and (isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int)
                                             or self.train_steps < 1):
            raise ValueError(f"MixtureConfig.train_steps must be None or a positive int, got {self.train_steps!r}")
        if self.block_size >= 2**31:
            raise ValueError(f"MixtureConfig.block_size too large: {self.block_size}")
        if self.max_bad_records < 0:
            raise ValueError(f"MixtureConfig.max_bad_records must be >= 0, got {self.max_bad_records}")
        if self.max_document_bytes < 1:
            raise ValueError(f"MixtureConfig.max_document_bytes must be >= 1, got {self.max_document_bytes}")
        if self.num_shards is not None and (self.num_shards < 1 or self.batch_size % self.num_shards):
            raise ValueError(f"MixtureConfig.num_shards={self.num_shards} must be >= 1 and divide "
                             f"batch_size={self.batch_size}")
        if self.worker_count < 0:
            raise ValueError(f"MixtureConfig.worker_count must be >= 0, got {self.worker_count}")
        if self.prefetch < 0:
            raise ValueError(f"MixtureConfig.prefetch must be >= 0, got {self.prefetch}")
        if not self.tokenizer:
            raise ValueError("MixtureConfig.tokenizer must name a tokenizer.json or a folder holding one")
        first, later, field = _split_schedule(self.weights, self.stages)
        object.__setattr__(self, "weights", normalize_weights(first, names))
        stages, last = [], 0
        for i, stage in later:
            if not (isinstance(stage, Sequence) and len(stage) == 2):
                raise ValueError(f"MixtureConfig.{field}[{i}] must be (start_step, weights), got {stage!r}")
            start, weights = stage
            if isinstance(start, bool) or not isinstance(start, int) or start <= last:
                raise ValueError(f"MixtureConfig.{field}[{i}]: start_step must be an int > {last} "
                                 f"(stages in increasing order after step 0), got {start!r}")
            stages.append((start, normalize_weights(weights, names, field=f"{field}[{i}]")))
            last = start
        object.__setattr__(self, "stages", tuple(stages))

    @property
    def active_components(self) -> tuple[Component, ...]:
        """Components with a positive weight in some stage, in config order (their index is `batch['component']`)."""
        schedules = [self.weights] + [w for _, w in self.stages]
        return tuple(c for c in self.components if any(w[c.name] > 0 for w in schedules))

    def weight_schedule(self) -> tuple[tuple[int, dict[str, float]], ...]:
        """((start_step, normalized weights over the active components), ...), the first at step 0."""
        names = [c.name for c in self.active_components]
        return tuple((start, {n: w[n] for n in names}) for start, w in ((0, self.weights),) + self.stages)

    def stage_rows(self, process_count: int = 1) -> list[tuple[int, int, dict[str, int]]]:
        """[(first step, end step, {active component: rows per data shard}), ...] for every stage of the run (those
        starting before `train_steps`), laid out as data.mixture lays out rows (data.blocks) from the token shares:
        exact for concat-then-split components, whose rows are full (data.pipeline turns first-fit components' token
        shares into row shares by their measured fill)."""
        if self.train_steps is None:
            raise ValueError("MixtureConfig.stage_rows needs MixtureConfig.train_steps (the run's length)")
        per_step = self.batch_size // self.shards(process_count)
        schedule = [(start, w) for start, w in self.weight_schedule() if start < self.train_steps]
        ends = [start for start, _ in schedule[1:]] + [self.train_steps]
        out = []
        for (start, weights), end in zip(schedule, ends):
            shares = list(weights.values())
            rows = stretch_rows(shares, (end - start) * per_step, block_rows(shares, self.block_size))
            out.append((start, end, {name: int(n) for name, n in zip(weights, rows)}))
        return out

    def check_run(self, process_count: int = 1) -> str | None:
        """Checks the shares against the run's rows before any data is read: a component with a positive share that
        gets no row in a stage of the run is a ValueError naming it and the bindings that fix it (unless
        `allow_unrealized_shares`). Returns a note when a stage's rows hold a share more than 1% (relative) away from
        its weight (16 rows at 10% hold 2 rows, 12.5%), else None. Open-ended mixtures (train_steps None) pass."""
        if self.train_steps is None:
            return None
        late = [start for start, _ in self.stages if start >= self.train_steps]
        if late:
            raise ValueError(f"MixtureConfig: the mixture schedule's stage(s) starting at step(s) {late} never apply "
                             f"in a run of TRAIN_STEPS={self.train_steps} steps; start them earlier in MIXTURE_WEIGHTS "
                             "or drop them")
        stages = self.stage_rows(process_count)
        per_step = self.batch_size // self.shards(process_count)
        notes = []
        for (start, end, rows), (_, weights) in zip(stages, self.weight_schedule()):
            where = "the run" if len(stages) == 1 else f"the stage of steps {start}-{end}"
            total = sum(rows.values())
            held = f"{total} rows per data shard ({end - start} steps x {per_step} rows)"
            empty = [n for n, r in rows.items() if weights[n] > 0 and r == 0]
            if empty and not self.allow_unrealized_shares:
                shares = ", ".join(f"{n!r} {weights[n]:.4g}" for n in empty)
                raise ValueError(f"MixtureConfig: the token share of {shares} gets no row in {where}: {held} hold "
                                 f"{rows}; raise TRAIN_STEPS or BATCH_SIZE, or bind "
                                 "MixtureConfig.allow_unrealized_shares = True to train without it")
            off = [f"{n!r} {weights[n]:.4g} as {r} rows ({r / total:.4g})" for n, r in rows.items()
                   if weights[n] > 0 and abs(r / total - weights[n]) > 0.01 * weights[n]]
            if off:
                notes.append(f"{where}'s {held} hold the shares only as whole rows: {', '.join(off)}")
        return "; ".join(notes) or None

    def shards(self, process_count: int) -> int:
        """Number of data shards for a run with `process_count` JAX processes."""
        shards = self.num_shards or math.lcm(default_num_shards(self.batch_size), process_count)
        if shards % process_count:
            raise ValueError(f"MixtureConfig.num_shards={shards} is not a multiple of the process count "
                             f"{process_count}")
        if self.batch_size % shards:
            raise ValueError(f"MixtureConfig.batch_size={self.batch_size} must be divisible by the {shards} data shards")
        return shards


MAX_DEFAULT_SHARDS = 64      # hosts of the largest pod whose resumes need no MixtureConfig.num_shards
MIN_ROWS_PER_SHARD = 8       # rows of each global batch a default shard fills (so its mixture blocks fill quickly)


def default_num_shards(batch_size: int) -> int:
    """The data shards of a run that does not set MixtureConfig.num_shards: the most, up to MAX_DEFAULT_SHARDS, that
    divide `batch_size` and leave each at least MIN_ROWS_PER_SHARD rows of every batch (1 below 2 * that). A
    function of the batch alone, so any process count dividing it reads the same global stream (batch 8 -> 1,
    16 -> 2, 64 -> 8, 1024 -> 64)."""
    return max(d for d in range(1, min(MAX_DEFAULT_SHARDS, batch_size) + 1)
               if batch_size % d == 0 and (d == 1 or batch_size // d >= MIN_ROWS_PER_SHARD))


def single_component_mixture(mixture: MixtureConfig, component: Component, batch_size: int) -> MixtureConfig:
    """The mixture's data settings (tokenizer, seq_len, BOS/EOS policy) over one component, one unshuffled pass:
    how held-out loss is read, both during training (trainer.loop) and by eval.heldout, so the two agree."""
    return dataclasses.replace(
        mixture, components=(dataclasses.replace(component, max_epochs=1, on_exhausted="stop", shuffle=False),),
        weights={component.name: 1.0}, stages=(), batch_size=batch_size, num_shards=None, worker_count=0,
        train_steps=None)
