"""Offline template renderer: spec + seed -> varied, readable documents with no model.

Document `index` of a run is a pure function of (spec content, seed, index, target length): its axes come from
`assign`, and every random choice from a private RNG stream, so a run is reproducible and extending `count` never
changes earlier documents. Each document is a header for its document type, an introduction, body sections (context,
the reasoning approach, evidence, AI-identity framing when the spec switches it on, implementation and stakeholder
sections, repeated with fresh sentences until the target length is reached; the approach and the framing always
appear) and a conclusion.
"""
from __future__ import annotations

import random
import re
from typing import Any, Iterator, Sequence

from data.synth import templates as T
from data.synth.assign import assign, item_rng
from data.synth.records import approx_tokens, make_record
from data.synth.spec import Spec, SpecError

GENERATOR = "docmix-template-renderer/1"
_ALT_RE = re.compile(r"\[([^\[\]]*\|[^\[\]]*)\]")
_SLOT_RE = re.compile(r"\{([a-z_]+?)(2?)\}")
# Pool slots drawn from the spec.
_POOL_SLOTS = {"practice": "practices", "outcome": "outcomes", "metric": "metrics", "phrase": "key_phrases",
               "claim": "claims", "stakeholder": "stakeholders", "subject": "subjects"}
_FOCUS_SLOTS = ("practice", "outcome", "metric")
_FOCUS_SHARE = 0.5
_CONCLUSION_RESERVE = 90  # approx tokens of a closing (or any one) paragraph, kept free


def check_renderable(spec: Spec) -> None:
    """Every document type and reasoning approach of the spec must have templates here."""
    for axis, known in (("document_type", T.DOC_TYPES), ("reasoning_approach", T.APPROACHES)):
        unknown = [v for v in spec.axes[axis] if v not in known]
        if unknown:
            raise SpecError(f"{spec.source}: the template renderer has no templates for {axis} {unknown}; "
                            f"known: {sorted(known)} (the LLM generator accepts any value)")


class Filler:
    """Resolves slots for one document: fixed axis values, seeded pool picks and numbers."""

    def __init__(self, spec: Spec, axes: dict[str, str], rng: random.Random):
        self.spec, self.rng = spec, rng
        self.fixed = {"institution": axes["institution"], "domain": axes["domain"], "theme": spec.theme,
                      "doc_type": axes["document_type"], "approach": axes["reasoning_approach"]}
        self.decks: dict[str, list[Any]] = {}
        self.drawn: dict[str, Any] = {}
        # A document keeps coming back to one practice, outcome and metric, so it reads as being about something.
        self.focus = {slot: rng.choice(spec.pools[_POOL_SLOTS[slot]]) for slot in _FOCUS_SLOTS}

    def draw(self, key: str, values: Sequence[Any]) -> Any:
        """Draws without replacement from a per-document deck, reshuffling when it runs out."""
        deck = self.decks.get(key)
        if not deck:
            deck = list(values)
            self.rng.shuffle(deck)
            if key in self.drawn and len(deck) > 1 and deck[-1] == self.drawn[key]:
                deck[0], deck[-1] = deck[-1], deck[0]  # a fresh deck never repeats the card just played
            self.decks[key] = deck
        self.drawn[key] = deck.pop()
        return self.drawn[key]

    def _person(self) -> str:
        title = self.rng.choice(T.TITLES_PERSON)
        name = f"{self.rng.choice(T.FIRST_NAMES)} {self.rng.choice(T.LAST_NAMES)}"
        return f"{title} {name}" if title else name

    def slot(self, name: str, last: dict[str, str], second: bool) -> str:
        if name in self.fixed:
            return self.fixed[name]
        if name in _POOL_SLOTS:
            if name in self.focus and not second and self.rng.random() < _FOCUS_SHARE:
                return self.focus[name]
            pool = self.spec.pools[_POOL_SLOTS[name]]
            value = self.draw(name, pool)
            if second and value == last.get(name) and len(pool) > 1:
                value = self.draw(name, pool)
            return value
        rng = self.rng
        simple = {"pct": lambda: str(rng.randint(8, 46)), "n": lambda: str(rng.randint(12, 480)),
                  "year": lambda: str(rng.randint(2016, 2025)), "months": lambda: str(rng.choice((6, 9, 12, 18, 24, 36))),
                  "ratio": lambda: f"{rng.uniform(1.3, 3.9):.1f}", "share": lambda: str(rng.randint(55, 94)), "small": lambda: str(rng.randint(2, 5)),
                  "person": self._person, "region": lambda: rng.choice(T.REGIONS),
                  "date": lambda: f"{rng.randint(1, 28)} {rng.choice(T.MONTHS)} {rng.randint(2019, 2025)}"}
        if name not in simple:
            raise KeyError(f"template slot {{{name}}} is not defined")
        value = simple[name]()
        if second and name == "year" and "year" in last:
            value = str(int(last["year"]) + rng.randint(2, 6))
        if second and name == "pct" and "pct" in last:  # the comparison figure is the lower one
            value = str(rng.randint(2, int(last["pct"]) - 1))
        return value

    def expand(self, template: str) -> str:
        """Picks `[a|b]` alternatives, fills slots, and capitalises the first letter of each line."""
        text = _ALT_RE.sub(lambda m: self.rng.choice(m.group(1).split("|")), template)
        last: dict[str, str] = {}

        def fill(match: re.Match) -> str:
            name, second = match.group(1), bool(match.group(2))
            value = self.slot(name, last, second)
            last.setdefault(name, value)
            return value

        text = _SLOT_RE.sub(fill, text)
        return "\n".join(line[:1].upper() + line[1:] for line in text.split("\n"))


def _heading(filler: Filler, kind: str, style: str, number: int) -> str:
    name = filler.expand(filler.draw(f"heading:{kind}", T.HEADINGS[kind]))
    return {"numbered": f"{number}. {name}", "caps": name.upper(), "plain": name, "markdown": f"## {name}"}[style]


def _paragraph(filler: Filler, pool_key: str, pool: Sequence[str], n_min: int = 3, n_max: int = 5) -> str:
    count = filler.rng.randint(n_min, n_max)
    return " ".join(filler.expand(filler.draw(pool_key, pool)) for _ in range(count))


def _body_plan(ai_identity: bool) -> Iterator[str]:
    """Section kinds in order (the caller keeps going past its target until the approach and framing appeared)."""
    first = ["context", "approach", "evidence"] + (["ai"] if ai_identity else []) + ["implementation", "stakeholders"]
    yield from first
    while True:
        yield from ["approach", "evidence", "implementation"] + (["ai"] if ai_identity else []) + ["stakeholders"]


def render_document(spec: Spec, seed: int, index: int, target_tokens: int | None = None) -> tuple[str, dict[str, str]]:
    """Renders document `index`; returns (text, axes). Length is about `target_tokens` approx tokens (spec default)."""
    target = target_tokens or spec.target_tokens
    axes = assign(spec, seed, index)
    filler = Filler(spec, axes, item_rng(spec, seed, "render", index, target))
    doc = T.DOC_TYPES[axes["document_type"]]
    filler.fixed["title"] = filler.expand(filler.rng.choice(T.TITLES))
    filler.fixed["date"] = filler.slot("date", {}, False)
    parts = [filler.expand(doc["header"]),
             filler.expand(filler.rng.choice(doc["intro"])) + " " + _paragraph(filler, "context", T.SECTIONS["context"], 2, 3)]
    pools = {**T.SECTIONS, "approach": T.APPROACHES[axes["reasoning_approach"]], "ai": spec.ai_framing}
    used = approx_tokens("\n\n".join(parts))
    number = 2
    required = {"approach", "ai"} if spec.ai_identity else {"approach"}
    for kind in _body_plan(spec.ai_identity):
        # Over budget (keeping room for the closing and any still-missing required sections): only required ones.
        if used + _CONCLUSION_RESERVE * (1 + len(required - {kind})) >= target:
            if not required:
                break
            if kind not in required:
                continue
        if kind == "ai":
            # The framing paragraph leads with two framing sentences and grounds them in the approach's reasoning.
            text = _paragraph(filler, "ai", pools["ai"], 2, 2) + " " + _paragraph(filler, "approach", pools["approach"], 1, 1)
        else:
            text = _paragraph(filler, kind, pools[kind])
        block = _heading(filler, kind, doc["style"], number) + "\n" + text
        parts.append(block)
        used += approx_tokens(block)
        number += 1
        required.discard(kind)
    parts.append(_heading(filler, "conclusion", doc["style"], number) + "\n"
                 + _paragraph(filler, "conclusion", T.SECTIONS["conclusion"], 2, 4))
    return "\n\n".join(parts), axes


def render_records(spec: Spec, *, count: int | None = None, seed: int | None = None, target_tokens: int | None = None,
                   created: str) -> Iterator[dict[str, Any]]:
    """Yields `count` document records (indices 0..count-1) with provenance."""
    check_renderable(spec)
    seed = spec.seed if seed is None else seed
    count = spec.count if count is None else count
    for index in range(count):
        text, axes = render_document(spec, seed, index, target_tokens)
        yield make_record(spec, seed, index, axes, generator=GENERATOR, created=created, text=text,
                          target_tokens=target_tokens or spec.target_tokens)
