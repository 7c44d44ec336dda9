"""A local copy of the ANIMA dataset (questions.jsonl + dimensions.jsonl) as Inspect samples and dimensions.

Releases spell dimension names differently (AHB 2.x "Trade-off Transparency", ANIMA-2.2 "Trade-Off Transparency"),
one question in AHB 2.x has an empty tag, and `variables` may carry spaces after the colon. The stock Hub loader drops
any question with an unrecognised tag; here tags are normalised to ANIMA-2.2 spelling, empty tags are skipped, tags
naming no dimension are reported (logged and returned), and a question left with nothing to score is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

from inspect_ai.dataset import Sample
from inspect_evals.anima.dataset import record_to_sample
from inspect_evals.anima.types import AnimaDimension

import storage

logger = logging.getLogger(__name__)

# ANIMA-2.2 spelling (CompassioninMachineLearning/anima @ the inspect_evals pinned revision).
ANIMA_DIMENSIONS = (
    "Moral Consideration", "Harm Minimization", "Sentience Acknowledgement", "Prejudice Avoidance",
    "Scope Sensitivity", "Evidence-Based Capacity Attribution", "Cautious Impact Consideration", "Actionability",
    "Contextual Welfare Salience", "Epistemic Humility", "Trade-Off Transparency", "Novel Entity Precaution",
    "Control Questions",
)
_CANONICAL = {name.lower(): name for name in ANIMA_DIMENSIONS}


def canonical_dimension(name: str) -> str:
    """Collapses whitespace and maps spelling variants (case) onto ANIMA-2.2's name; unknown names keep their text."""
    collapsed = " ".join(name.split())
    return _CANONICAL.get(collapsed.lower(), collapsed)


@dataclasses.dataclass(frozen=True)
class LocalAnima:
    dimensions: tuple[AnimaDimension, ...]
    samples: tuple[Sample, ...]
    ignored_tags: dict[int, tuple[str, ...]]  # question id -> tags that name no dimension (not scored)
    files_sha256: dict[str, str]  # questions.jsonl / dimensions.jsonl -> digest, to identify the copy

    @property
    def dims_by_name(self) -> dict[str, AnimaDimension]:
        return {d.name: d for d in self.dimensions}


def _read_jsonl(path: storage.Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (an ANIMA dataset dir holds questions.jsonl and dimensions.jsonl)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
    return rows


def _require(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def load_dimensions(path: storage.Path) -> tuple[AnimaDimension, ...]:
    dims = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _require(row, ("dimension", "guiding_question", "scoring"), where)
        dims.append(AnimaDimension(
            name=canonical_dimension(row["dimension"]),
            weight=float(row.get("default_weighting", 1.0)),
            scoring_description=row["scoring"],
            guiding_question=row["guiding_question"],
            indicators=row.get("observable_indicators") or "",
        ))
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate dimension names after normalisation: {names}")
    return tuple(dims)


def parse_variables(text: str | None, where: str) -> str | None:
    """'animal: guinea pig, naked mole rats' -> 'animal:guinea pig,naked mole rats' (one `key:values` per line)."""
    if not text or not text.strip():
        return None
    lines = []
    for spec in text.strip().split("\n"):
        key, sep, values = spec.partition(":")
        cleaned = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not cleaned:
            raise ValueError(f"{where}: malformed variables {spec!r} (expected 'name: value, value')")
        lines.append(f"{key.strip()}:{','.join(cleaned)}")
    return "\n".join(lines)


def load(dataset_dir: str | pathlib.Path, languages: Sequence[str] | None = None) -> LocalAnima:
    """Reads `dataset_dir`/{questions,dimensions}.jsonl. `languages` keeps only those languages (null -> "English")."""
    root = storage.Path(dataset_dir)
    dimensions = load_dimensions(root / "dimensions.jsonl")
    known = {d.name for d in dimensions}
    convert = record_to_sample(known)
    wanted = {lang.strip() for lang in languages} if languages else None
    samples, ignored = [], {}
    for lineno, row in _read_jsonl(root / "questions.jsonl"):
        where = f"{root / 'questions.jsonl'}:{lineno}"
        _require(row, ("id", "question", "tags"), where)
        if not isinstance(row["tags"], list) or not str(row["question"]).strip():
            raise ValueError(f"{where}: 'tags' must be a list and 'question' non-empty")
        tags = [canonical_dimension(t) for t in row["tags"] if t and t.strip()]
        unknown = tuple(t for t in tags if t not in known)
        if unknown:
            logger.warning("%s: question %s: tags %s name no dimension and are not scored", where, row["id"], unknown)
            ignored[row["id"]] = unknown
        scored = list(dict.fromkeys(t for t in tags if t in known))
        if not scored:
            raise ValueError(f"{where}: question {row['id']} has no tag naming a dimension (tags {row['tags']!r})")
        language = row.get("language") or "English"
        if wanted is not None and language not in wanted:
            continue
        record = {**row, "tags": scored, "variables": parse_variables(row.get("variables"), where), "language": language}
        sample = convert(record)
        if not isinstance(sample, Sample):  # inspect_evals returns [] for a record it would skip
            raise ValueError(f"{where}: inspect_evals rejected question {row['id']}")
        samples.append(sample)
    if not samples:
        raise ValueError(f"{root}: no questions left (languages={languages!r})")
    digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()
               for name in ("questions.jsonl", "dimensions.jsonl")}
    return LocalAnima(dimensions=dimensions, samples=tuple(samples), ignored_tags=ignored, files_sha256=digests)

