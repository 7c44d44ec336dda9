"""Question-answer pairs from a spec, for the instruction-tuning control arm.

Pair `index` uses the same deterministic axis assignment and slot pools as the document renderer, so a QA arm and a
document arm built from one spec cover the same institutions, domains and reasoning approaches. The answer is an
opener, one sentence of the pair's reasoning approach, one evidence sentence, (with AI-identity framing on) one
framing sentence, and a closer. Formats are the ones `data.sft` reads: chat `messages` or Alpaca
`instruction`/`input`/`output`; either way the record carries the same provenance as documents.
"""
from __future__ import annotations

from typing import Any, Iterator

from data.synth import templates as T
from data.synth.assign import assign, item_rng
from data.synth.records import make_record
from data.synth.render import Filler, check_renderable
from data.synth.spec import Spec

GENERATOR = "docmix-template-qa/1"
FORMATS = ("chat", "alpaca")


def render_pair(spec: Spec, seed: int, index: int) -> tuple[str, str, dict[str, str]]:
    """(question, answer, axes) of pair `index`."""
    axes = assign(spec, seed, index)
    filler = Filler(spec, axes, item_rng(spec, seed, "qa", index))
    question = filler.expand(filler.rng.choice(T.QUESTIONS))
    parts = [filler.rng.choice(T.ANSWER_OPENERS), filler.rng.choice(T.APPROACHES[axes["reasoning_approach"]]),
             filler.rng.choice(T.SECTIONS["evidence"])]
    if spec.ai_identity:
        parts.append(filler.rng.choice(spec.ai_framing))
    parts.append(filler.rng.choice(T.ANSWER_CLOSERS))
    # The opener may already be a claim; avoid the same sentence twice when the evidence template is `{claim}` too.
    answer = " ".join(dict.fromkeys(filler.expand(p) for p in parts))
    return question, answer, axes


def qa_records(spec: Spec, *, count: int | None = None, seed: int | None = None, fmt: str = "chat",
               created: str) -> Iterator[dict[str, Any]]:
    """Yields `count` QA records in `fmt` ("chat": `messages`; "alpaca": `instruction`/`input`/`output`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown QA format {fmt!r}; choose one of {FORMATS}")
    check_renderable(spec)
    seed = spec.seed if seed is None else seed
    for index in range(spec.count if count is None else count):
        question, answer, axes = render_pair(spec, seed, index)
        fields = ({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                  if fmt == "chat" else {"instruction": question, "input": "", "output": answer})
        yield make_record(spec, seed, index, axes, generator=GENERATOR, created=created, kind="qa", **fields)
