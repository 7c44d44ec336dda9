"""In-loop probes: value probe sets scored on the live parameters while a run trains, and what is logged of them.

With `TrainConfig.probe_sets`, the step loop scores the sets at step 0 (the starting parameters: the base model, or
the previous stage's), every `TrainConfig.probe_every` steps and at the last step, and logs with that step's record
(metrics.jsonl, TensorBoard, W&B; step 0 gets a record of its own):
  probe/NAME/margin    mean margin (chosen - rejected, nats/token) over the set's pairs
  probe/NAME/accuracy  fraction of pairs with margin > 0
  probe/NAME/shift_minus_control   (margin - margin at step 0) - (the control set's margin - its margin at step 0),
                       for each value set when TrainConfig.probe_control names a neutral control set
  probe/seconds        wall time of the scoring
NAME is the set file's stem. Every pair's margin goes to MODEL_DIR/probes.jsonl, one record per scored step:
{"step", "margins": {NAME: [per pair]}, "control": NAME or null, "sets_sha256": {NAME: sha256 of the file}} (what
experiments.durability draws its curves and CIs from). A resumed run drops both files' records past the step it
resumes from, as metrics.jsonl's are, and takes step 0's margins from probes.jsonl.

The scoring (tokenizing, packing, forward passes) is eval's: train.py hands a `ScorerFactory` (eval.live_probes) to
trainer.loop.train, so trainer/ never imports eval/. Every process calls the scorer (each takes part in the sharded
computation); process 0 writes.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np

import storage
from trainer import metrics_file

log = logging.getLogger(__name__)

FILE = "probes.jsonl"


class Scorer(Protocol):
    """Per-pair margins of every set on the given parameters. `names`: the sets (the control set among them);
    `control`: the control set's name or None; `digests`: sha256 of each set's file."""
    names: tuple[str, ...]
    control: str | None
    digests: dict[str, str]

    def __call__(self, params: Any) -> dict[str, np.ndarray]: ...


ScorerFactory = Callable[..., Scorer]  # (run: RunConfig, mesh: Mesh, graphdef: nnx.GraphDef) -> Scorer


def summary(margins: Mapping[str, np.ndarray], baseline: Mapping[str, float] | None, control: str | None
            ) -> dict[str, float]:
    """The logged entries of one scored step: margin and accuracy per set; with a control set and the step-0 mean
    margins (`baseline`), each value set's shift minus the control set's shift."""
    out: dict[str, float] = {}
    for name, m in margins.items():
        out[f"probe/{name}/margin"] = float(np.mean(m))
        out[f"probe/{name}/accuracy"] = float(np.mean(np.asarray(m) > 0))
    if control is not None and baseline is not None and control in baseline:
        control_shift = out[f"probe/{control}/margin"] - baseline[control]
        for name in margins:
            if name != control and name in baseline:
                out[f"probe/{name}/shift_minus_control"] = out[f"probe/{name}/margin"] - baseline[name] - control_shift
    return out


def read(model_dir: str | storage.Path) -> list[dict[str, Any]]:
    """The records of MODEL_DIR/probes.jsonl, by step (a step scored twice, e.g. redone after a resume: the last)."""
    records = {rec["step"]: rec for rec in metrics_file.read(storage.Path(model_dir) / FILE)}
    return [records[s] for s in sorted(records)]


class InLoopProbes:
    """When to score (`due`), and scoring a step (`score`): returns the entries to log with the step's record and, on
    process 0, appends the per-pair margins to MODEL_DIR/probes.jsonl."""

    def __init__(self, scorer: Scorer, *, every: int, train_steps: int, model_dir: str | storage.Path, kept: int):
        """kept: the last step whose records are kept (the step resumed from; -1 for a run that starts at step 0,
        whose step-0 record is redone)."""
        self.scorer, self.every, self.train_steps = scorer, every, train_steps
        self.path = storage.Path(model_dir) / FILE
        self.writer = jax.process_index() == 0
        self.baseline: dict[str, float] | None = None
        self.last_scored: int | None = None
        if self.writer:
            metrics_file.truncate_after(self.path, kept)
            self.file = metrics_file.MetricsFile(self.path)  # O(1) per record on gs:// too
            if kept >= 0:
                self.baseline = self._saved_baseline()

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.train_steps

    def score(self, step: int, params: Any) -> dict[str, float]:
        start = time.perf_counter()
        margins = self.scorer(params)
        if step == 0:
            self.baseline = {name: float(np.mean(m)) for name, m in margins.items()}
        entries = summary(margins, self.baseline, self.scorer.control)
        entries["probe/seconds"] = time.perf_counter() - start
        if self.writer:
            record = {"step": step, "margins": {name: np.asarray(m).tolist() for name, m in margins.items()},
                      "control": self.scorer.control, "sets_sha256": self.scorer.digests}
            self.file.append([record])
        self.last_scored = step
        return entries

    def _saved_baseline(self) -> dict[str, float] | None:
        """Step 0's mean margins from probes.jsonl, for the sets whose file is unchanged; None (the shift is not
        logged) when the run was not scored at step 0."""
        first = next((r for r in read(self.path.parent) if r["step"] == 0), None)
        if first is None:
            log.warning("%s holds no step-0 probe record (probes were not scored when this run started): the shift "
                        "against step 0 is not logged", self.path)
            return None
        same = {name for name, digest in first.get("sets_sha256", {}).items()
                if self.scorer.digests.get(name) == digest}
        changed = sorted(set(self.scorer.names) - same)
        if changed:
            log.warning("%s: probe sets %s are not the files scored at step 0: their shift is not logged", self.path,
                        changed)
        return {name: float(np.mean(m)) for name, m in first["margins"].items() if name in same}
