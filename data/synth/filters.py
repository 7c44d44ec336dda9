"""Corpus hygiene: length bounds, refusal / meta-commentary detection, near-duplicate removal.

`apply_filters` runs them in that order (cheap checks first, dedup last so that rejected documents cannot shadow
clean ones) and returns the kept records, the rejected ones with a `reject_reason`, and a per-filter count.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from data.synth.dedup import near_duplicates
from data.synth.records import approx_tokens, record_text

# (name, pattern): what LLM writers emit instead of, or around, the document. Case-insensitive. Sentence-initial
# anchors keep ordinary prose ("an AI assistant drafted ...", AI-identity framing) from matching.
REFUSAL_PATTERNS: tuple[tuple[str, str], ...] = (
    ("as_an_ai", r"(?:^|[.!?]\s+|\n)\W*as an ai\b|\bas an ai (?:language )?model\b|\bi(?: am|'m) (?:just )?an ai\b"),
    ("language_model", r"\bas a (?:large )?language model\b"),
    ("refusal", r"\bi(?:'m| am)? ?(?:sorry|afraid),? but\b"
                r"|\bi (?:can't|cannot|can ?not|won't|am unable to|'m unable to)"
                r" (?:help|assist|write|provide|create|comply|fulfil|fulfill|generate|produce)\b"),
    ("apology", r"(?:^|\n)\W*i apologi[sz]e\b"),
    ("meta_preamble", r"^\W*(?:sure|certainly|of course|absolutely)[!,.:]"
                      r"|^\W*here(?: is|'s| are) (?:a|an|the|your|my)\b[^\n]{0,80}"
                      r"\b(?:memo|document|abstract|report|draft|paper|summary|guide|note|case study|version|article)"),
    ("meta_closing", r"\bi hope (?:this|that) (?:helps|meets|is helpful)\b|\blet me know if\b"
                     r"|\bfeel free to (?:ask|adjust|modify)\b"),
    ("placeholder", r"\[(?:insert|your|name|date|company|organi[sz]ation)[^\]]{0,40}\]"),
    ("word_count_note", r"\(?\bword count\b\s*:?\s*\d+|\bthis (?:document|memo|report) is (?:fictional|a fictional)\b"),
)
_COMPILED = tuple((name, re.compile(p, re.IGNORECASE)) for name, p in REFUSAL_PATTERNS)


def refusal_reason(text: str) -> str | None:
    """Name of the first refusal / meta-commentary pattern found in `text`, else None."""
    for name, pattern in _COMPILED:
        if pattern.search(text):
            return name
    return None


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Bounds in approx tokens (words + punctuation, records.approx_tokens); max_tokens=None for no upper bound."""

    min_tokens: int = 50
    max_tokens: int | None = None
    refusals: bool = True
    dedup: bool = True
    dedup_threshold: float = 0.8
    dedup_ngram: int = 5

    def __post_init__(self):
        if self.min_tokens < 0 or (self.max_tokens is not None and self.max_tokens < self.min_tokens):
            raise ValueError(f"bad length bounds: min_tokens={self.min_tokens}, max_tokens={self.max_tokens}")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")


@dataclasses.dataclass(frozen=True)
class FilterResult:
    kept: list[dict[str, Any]]
    rejected: list[dict[str, Any]]  # input records plus `reject_reason`
    removed: dict[str, int]  # filter name -> records it removed
    total: int


def apply_filters(records: Sequence[dict[str, Any]], config: FilterConfig = FilterConfig()) -> FilterResult:
    """Length, then refusal/meta-commentary, then near-duplicates; order of kept records is preserved."""
    removed = {"length": 0, "refusal": 0, "near_duplicate": 0}
    rejected: list[dict[str, Any]] = []
    survivors: list[dict[str, Any]] = []
    for record in records:
        text = record_text(record)
        n = approx_tokens(text)
        reason = None
        if n < config.min_tokens or (config.max_tokens is not None and n > config.max_tokens):
            reason, key = f"length:{n}", "length"
        elif config.refusals and (hit := refusal_reason(text)):
            reason, key = f"refusal:{hit}", "refusal"
        if reason:
            removed[key] += 1
            rejected.append({**record, "reject_reason": reason})
        else:
            survivors.append(record)
    if config.dedup and survivors:
        dupes = near_duplicates([record_text(r) for r in survivors], threshold=config.dedup_threshold,
                                ngram=config.dedup_ngram)
        drop = {d.index: d for d in dupes}
        for i, d in drop.items():
            of = survivors[d.of].get("id", d.of)
            rejected.append({**survivors[i], "reject_reason": f"near_duplicate:{of}:{d.similarity:.3f}"})
        removed["near_duplicate"] = len(drop)
        survivors = [r for i, r in enumerate(survivors) if i not in drop]
    return FilterResult(survivors, rejected, removed, len(records))
