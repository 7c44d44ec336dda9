"""Corpus statistics: documents, tokens, the distribution over each template axis, and what each filter removed."""
from __future__ import annotations

import collections
import json
import pathlib
from typing import Any, Callable, Iterable

import storage
from data.synth.records import approx_tokens, record_text
from data.synth.spec import AXES


def filter_report_path(corpus: str | pathlib.Path) -> storage.Path:
    """Where `filter` writes its report for an output corpus: `<corpus>.filter.json` (local or gs://)."""
    corpus = storage.Path(corpus)
    return corpus.with_name(corpus.name + ".filter.json")


def corpus_stats(records: Iterable[dict[str, Any]], count_tokens: Callable[[str], int] = approx_tokens
                 ) -> dict[str, Any]:
    """{documents, tokens: {total, mean, min, max}, axes: {axis: {value: n}}, specs, generators, ai_identity}."""
    lengths: list[int] = []
    axes = {axis: collections.Counter() for axis in AXES}
    specs, generators, framing = collections.Counter(), collections.Counter(), collections.Counter()
    for record in records:
        lengths.append(count_tokens(record_text(record)))
        for axis in AXES:
            axes[axis][(record.get("axes") or {}).get(axis, "(none)")] += 1
        specs[record.get("spec", "(none)")] += 1
        generators[record.get("generator", "(none)")] += 1
        framing[str(record.get("ai_identity", "(none)"))] += 1
    total = sum(lengths)
    return {"documents": len(lengths),
            "tokens": {"total": total, "mean": round(total / len(lengths), 1) if lengths else 0,
                       "min": min(lengths, default=0), "max": max(lengths, default=0)},
            "axes": {axis: dict(counter.most_common()) for axis, counter in axes.items()},
            "specs": dict(specs), "generators": dict(generators), "ai_identity": dict(framing)}


def format_stats(stats: dict[str, Any], removed: dict[str, int] | None = None) -> str:
    """A human-readable summary (axis distributions shortened to counts, coverage and extremes)."""
    t = stats["tokens"]
    lines = [f"documents: {stats['documents']}",
             f"tokens: {t['total']} (mean {t['mean']}, min {t['min']}, max {t['max']})",
             f"specs: {stats['specs']}", f"generators: {stats['generators']}", f"ai_identity: {stats['ai_identity']}"]
    for axis, counts in stats["axes"].items():
        if counts:
            values = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(f"{axis}: {len(counts)} values, most {values[0][0]!r} x{values[0][1]}, "
                         f"least {values[-1][0]!r} x{values[-1][1]}")
    if removed is not None:
        lines.append("removed by filters: " + ", ".join(f"{k} {v}" for k, v in removed.items()))
    return "\n".join(lines)


def load_removed(corpus: str | pathlib.Path) -> dict[str, int] | None:
    """The per-filter removal counts `filter` recorded next to `corpus`, if any."""
    path = filter_report_path(corpus)
    return json.loads(path.read_text())["removed"] if path.exists() else None
