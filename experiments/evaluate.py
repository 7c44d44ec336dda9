"""Evaluating the checkpoints of an experiment with the eval modules: per-pair probe margins (eval.probes), held-out
loss (eval.heldout) and, optionally, ANIMA (eval.anima). Results are cached per checkpoint, so rerunning an experiment
evaluates only what is new."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

import repo
import storage
from eval import probe_pairs, probes
from experiments.settings import SettingsError, Table


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """pairs: value probe sets; control_pairs: the neutral set every shift is compared with."""
    pairs: tuple[storage.Path, ...]
    control_pairs: storage.Path | None
    heldout: bool = True
    heldout_batches: int = 4
    bootstrap: int = 2000
    batch_size: int = 16
    chat: bool = False
    anima_grader: str | None = None
    anima_epochs: int = 5

    @property
    def set_names(self) -> list[str]:
        return [p.stem for p in self.pairs]

    def probe_bindings(self, every: int) -> tuple[str, ...]:
        """train.py bindings that score these sets in the loop (TrainConfig.probe_sets) every `every` steps, as
        `evaluate` scores a checkpoint (same pairs, control set, rows per call, chat mode)."""
        control = (f"TrainConfig.probe_control = {str(self.control_pairs)!r}",) if self.control_pairs else ()
        return (f"TrainConfig.probe_sets = {tuple(str(p) for p in self.pairs)!r}", f"TrainConfig.probe_every = {every}",
                f"TrainConfig.probe_batch_size = {self.batch_size}", f"TrainConfig.probe_chat = {self.chat}", *control)

    def in_loop_margins(self, record: dict[str, Any], where: str) -> dict[str, list[float]]:
        """{set: per-pair margins, "control": ...} (as `evaluate` returns them) of one probes.jsonl record
        (trainer.probes_in_loop) of a run that scored these sets; `where` names the record in errors."""
        wanted = dict(zip(self.set_names, self.set_names)) | (
            {"control": self.control_pairs.stem} if self.control_pairs else {})
        missing = sorted(stem for stem in wanted.values() if stem not in record["margins"])
        if missing:
            raise ValueError(f"{where}: no in-loop margins of {missing} (the run scored {sorted(record['margins'])})")
        return {name: record["margins"][stem] for name, stem in wanted.items()}

    def read_sets(self) -> dict[str, list[probe_pairs.Pair]]:
        """Every set's pairs (chat-style ones only in chat mode); control set under the key "control"."""
        files = dict(zip(self.set_names, self.pairs)) | ({"control": self.control_pairs} if self.control_pairs else {})
        sets = {name: probe_pairs.read_pairs(path) for name, path in files.items()}
        return {name: probe_pairs.chat_pairs(p) for name, p in sets.items()} if self.chat else sets


def settings(table: Table) -> EvalSettings:
    def path(p: str) -> storage.Path:
        """A probe file: an absolute path or URL as it is; a relative path in the repository (eval/probe_sets/...)
        or else in the working directory."""
        fixed = storage.is_remote(p) or os.path.isabs(p)
        for resolved in [storage.Path(p)] if fixed else [storage.Path(repo.ROOT / p), storage.absolute(p)]:
            if resolved.is_file():
                return resolved
        raise SettingsError(f"{table.where}: probe file {p} not found")

    pairs = tuple(path(p) for p in table.get_list("pairs", str, nonempty=True))
    control = table.get("control_pairs", str, None)
    if len({p.stem for p in pairs}) != len(pairs) or "control" in {p.stem for p in pairs}:
        raise SettingsError(f"{table.where}: probe set file names must be distinct and not 'control'")
    return EvalSettings(pairs=pairs, control_pairs=path(control) if control else None,
                        heldout=table.get("heldout", bool, True), heldout_batches=table.get("heldout_batches", int, 4),
                        bootstrap=table.get("bootstrap", int, 2000), batch_size=table.get("batch_size", int, 16),
                        chat=table.get("chat", bool, False), anima_grader=table.get("anima_grader", str, "") or None,
                        anima_epochs=table.get("anima_epochs", int, 5))


def evaluate(checkpoint: storage.Path, s: EvalSettings, cache: storage.Path, *,
             heldout_model: storage.Path | None = None) -> dict[str, Any]:
    """{"margins": {set: [per-pair margin]}, "heldout": {component: loss}, "anima": {...}} of one checkpoint (a run
    directory's latest checkpoint, a step directory or an HF folder), read from `cache` when already computed.

    Each set's probe summary is also saved beside the checkpoint (probes-<set>.json), where eval.report reads it.
    On a terminal a bar shows the pairs scored.
    """
    if cache.is_file():
        return json.loads(cache.read_text())
    import progress

    sets = s.read_sets()
    with progress.bar(sum(len(p) for p in sets.values()), f"probes {checkpoint.name}", "pair") as bar:
        margins, _ = probes.score_and_digest(checkpoint, list(sets.values()), batch_size=s.batch_size,
                                             chat_mode=s.chat, progress=bar)
    result: dict[str, Any] = {"checkpoint": str(checkpoint),
                              "margins": {name: m.tolist() for name, m in zip(sets, margins)}}
    for (name, pairs), m in zip(sets.items(), margins):
        file = s.control_pairs if name == "control" else s.pairs[s.set_names.index(name)]
        out = probes.result_path(checkpoint, file, chat_mode=s.chat)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(probes.report(pairs, np.asarray(m), n_boot=s.bootstrap), indent=2) + "\n")
    if s.heldout:
        from eval import heldout

        held = heldout.main(["--model", str(heldout_model or checkpoint), "--batches", str(s.heldout_batches)])
        result["heldout"] = {name: r["loss"] for name, r in held["components"].items()}
    if s.anima_grader:
        from eval import anima

        hf = checkpoint / "hf" if (checkpoint / "hf").is_dir() else checkpoint
        full = anima.run(str(hf), s.anima_grader, epochs=s.anima_epochs)
        result["anima"] = {k: full.get(k) for k in ("overall_mean", "dimension_normalized_avg", "n_scored")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result) + "\n")
    return result
