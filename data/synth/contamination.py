"""Contamination check: word n-gram overlap (13-grams by default) between a corpus and evaluation prompts.

Text is normalised to lower-case word tokens (punctuation and case ignored). An eval item shorter than `n` words but
at least `min_words` long is matched as a whole; shorter items cannot be checked meaningfully and are counted as
`skipped_short`. Eval files are JSONL; the prompt is read from `field` or, by default, the first of
question / prompt / input / instruction / text present (or the user turns of `messages`).
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

from data.synth.records import read_jsonl, record_text

_WORD_RE = re.compile(r"\w+")
PROMPT_FIELDS = ("question", "prompt", "input", "instruction", "text")


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def prompt_of(record: dict[str, Any], field: str | None, where: str) -> str:
    """The prompt text of an eval record; raises naming `where` (file:line) if the field is missing."""
    if field:
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: eval record has no string field {field!r}")
        return record[field]
    for key in PROMPT_FIELDS:
        if isinstance(record.get(key), str) and record[key].strip():
            return record[key]
    if isinstance(record.get("messages"), list):
        return "\n".join(m.get("content", "") for m in record["messages"] if m.get("role") == "user")
    raise ValueError(f"{where}: eval record has none of {PROMPT_FIELDS} or user `messages`; pass --field")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    source: str  # file:line
    id: str
    words: tuple[str, ...]


def load_eval_items(paths: Sequence[str | pathlib.Path], field: str | None = None) -> list[EvalItem]:
    items = []
    for path in paths:
        for lineno, record in enumerate(read_jsonl(path, require=()), 1):
            where = f"{path}:{lineno}"
            items.append(EvalItem(where, str(record.get("id", where)), tuple(words(prompt_of(record, field, where)))))
    return items


@dataclasses.dataclass(frozen=True)
class Hit:
    """Corpus record `index` shares `ngrams` distinct n-grams with the eval items `eval_ids`."""

    index: int
    id: str
    ngrams: int
    eval_ids: tuple[str, ...]
    example: str


@dataclasses.dataclass(frozen=True)
class Report:
    n: int
    documents: int
    eval_items: int
    skipped_short: int
    hits: tuple[Hit, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "documents": self.documents, "eval_items": self.eval_items,
                "skipped_short": self.skipped_short, "contaminated_documents": len(self.hits),
                "hits": [dataclasses.asdict(h) for h in self.hits]}


class Index:
    """All n-grams of the eval items (full sequences for items of min_words..n-1 words), by length."""

    def __init__(self, items: Sequence[EvalItem], n: int = 13, min_words: int = 8):
        if n < 1 or min_words < 1:
            raise ValueError(f"n and min_words must be >= 1, got n={n}, min_words={min_words}")
        self.n, self.items = n, list(items)
        self.grams: dict[int, dict[tuple[str, ...], set[str]]] = defaultdict(lambda: defaultdict(set))
        self.skipped_short = 0
        for item in self.items:
            w = item.words
            if len(w) >= n:
                for i in range(len(w) - n + 1):
                    self.grams[n][w[i:i + n]].add(item.id)
            elif len(w) >= min_words:
                self.grams[len(w)][w].add(item.id)
            else:
                self.skipped_short += 1

    def check(self, text: str) -> tuple[int, set[str], str]:
        """(distinct matching n-grams, eval ids matched, one matching n-gram as text)."""
        w = words(text)
        count, ids, example = 0, set(), ""
        for length, table in self.grams.items():
            seen = set()
            for i in range(len(w) - length + 1):
                gram = tuple(w[i:i + length])
                if gram in table and gram not in seen:
                    seen.add(gram)
                    ids |= table[gram]
                    example = example or " ".join(gram)
            count += len(seen)
        return count, ids, example


def check_corpus(records: Iterable[dict[str, Any]], index: Index) -> Report:
    hits, total = [], 0
    for i, record in enumerate(records):
        total += 1
        count, ids, example = index.check(record_text(record))
        if count:
            hits.append(Hit(i, str(record.get("id", i)), count, tuple(sorted(ids)), example))
    return Report(index.n, total, len(index.items), index.skipped_short, tuple(hits))
