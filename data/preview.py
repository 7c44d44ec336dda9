"""Preview a mixture: realized shares over the first N batches, and a few decoded rows per component.

The command line that reads a run's gin files for it is `python -m trainer.preview` (its --json output is `preview()`'s
result without "samples"). Text that is not a loss target is shown in [[double brackets]] (`render_row`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from data.config import MixtureConfig
from data.pipeline import Pipeline, build


def preview(config: MixtureConfig, num_batches: int, *, samples: int = 0) -> dict[str, Any]:
    """Reads `num_batches` global batches (one process); `samples` decoded rows per component go under "samples".
    On a terminal, a line while the corpora are opened and a bar over the batches (progress)."""
    import progress

    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    progress.note("data.preview: opening the corpora (every record of each is checked once)")
    pipeline = build(config)
    shown: dict[str, list[str]] = {n: [] for n in pipeline.component_names}
    starts = [start for start, _ in config.weight_schedule()]
    marks = []  # (step, counts so far) at every stage start reached, and at the end
    with progress.bar(num_batches, "data.preview", "batch") as bar:
        for step in range(num_batches):
            if step in starts:
                marks.append((step, pipeline.iterator.counts()))
            try:
                batch = next(pipeline.iterator)
            except StopIteration:
                break
            bar.update()
            for i, c in enumerate(batch["component"]):
                name = pipeline.component_names[c]
                if len(shown[name]) < samples:
                    shown[name].append(render_row(pipeline, batch, i))
    marks.append((pipeline.iterator.counts()["batches"], pipeline.iterator.counts()))
    pipeline.iterator.close()  # stops the prefetch thread
    stats = pipeline.stats()
    weights = config.weights
    out = {"components": {n: {"weight": weights[n], "token_share": s["token_share"], "rows": s["rows"],
                              "tokens": s["tokens"], "documents": s["documents"], "epochs": s["epochs"]}
                          for n, s in stats["components"].items()},
           "padding_fraction": stats["padding_fraction"], "rows": stats["rows"],
           "stages": [stage_shares(dict(config.weight_schedule())[start], first, last)
                      for (start, first), (_, last) in zip(marks, marks[1:])]}
    if samples:
        out["samples"] = shown
    return out


def stage_shares(weights: dict[str, float], first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """One stage's realized rows, tokens and token shares: the difference of the iterator's counts (StatsIterator)
    at its first step and after its last."""
    rows = {n: last["rows"][n] - first["rows"][n] for n in weights}
    tokens = {n: last["tokens"][n] - first["tokens"][n] for n in weights}
    total = max(sum(tokens.values()), 1)
    return {"start": first["batches"], "end": last["batches"], "weights": weights,
            "components": {n: {"token_share": tokens[n] / total, "rows": rows[n], "tokens": tokens[n]}
                          for n in weights}}


def render_row(pipeline: Pipeline, batch: dict[str, np.ndarray], i: int, max_chars: int = 400) -> str:
    """Row i decoded segment by segment (' | ' between segments); non-target stretches in [[...]]."""
    toks, seg, mask = batch["tokens"][i], batch["segment_ids"][i], batch["loss_mask"][i]
    parts = []
    for s in range(1, int(seg.max()) + 1):
        idx = np.flatnonzero(seg == s)
        runs = np.split(idx, np.flatnonzero(np.diff(mask[idx] > 0)) + 1)
        text = ""
        for run in runs:
            piece = pipeline.encoder.decode(toks[run])
            text += piece if mask[run[0]] > 0 else f"[[{piece}]]"
        parts.append(text)
    out = " | ".join(parts)
    return out if len(out) <= max_chars else out[:max_chars] + "…"


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'component':<16}{'weight':>8}{'token share':>13}{'rows':>8}{'tokens':>12}{'documents':>11}"
             f"{'epochs':>9}"]
    for name, c in result["components"].items():
        lines.append(f"{name:<16}{c['weight']:>8.4f}{c['token_share']:>13.4f}{c['rows']:>8}{c['tokens']:>12}"
                     f"{c['documents']:>11}{c['epochs']:>9.3f}")
    lines.append(f"rows {result['rows']}, padding fraction {result['padding_fraction']:.4f}")
    if len(result["stages"]) > 1:
        for stage in result["stages"]:
            lines.append(f"\nstage from step {stage['start']} (steps {stage['start']}-{stage['end'] - 1} read)")
            lines += [f"  {name:<14}{stage['weights'][name]:>8.4f}{c['token_share']:>13.4f}{c['rows']:>8}"
                      f"{c['tokens']:>12}" for name, c in stage["components"].items()]
    for name, rows in result.get("samples", {}).items():
        lines.append(f"\n--- {name} ---")
        lines += [f"  {r!r}" for r in rows]
    return "\n".join(lines)
