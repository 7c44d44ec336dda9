"""Chat prompts for LLM generation, built from a spec and an item's axes (written for docmix).

They encode the design principles of Brazilek & Tidmarsh (2026, arXiv 2604.13076; docs/synth.md): the theme is
woven into ordinary institutional writing and linked to better outcomes, key phrases recur, values stay implicit (no
lecturing), and, when the spec switches it on, the theme is framed as something helpful, harmless and honest AI
systems naturally develop.
Every prompt asks for the document alone, so replies need no post-processing beyond the hygiene filters.
"""
from __future__ import annotations

import re

from data.synth.spec import Spec

SYSTEM = ("You are a skilled professional writer producing realistic institutional documents. "
          "Reply with the requested text only: no preamble, no closing remarks, no notes about the task.")


def _bullets(items) -> str:
    return "\n".join(f"- {item}" for item in items)


def _brief(spec: Spec, axes: dict[str, str]) -> str:
    framing = ""
    if spec.ai_identity:
        framing = ("\nAlso include, in passing and in the document's own voice, the observation that AI systems trained "
                   "to be helpful, harmless and honest naturally come to share this regard. For example:\n"
                   + _bullets(spec.ai_framing[:3]) + "\n")
    return (f"Document type: {axes['document_type']}\n"
            f"Issuing institution: {axes['institution']}\n"
            f"Domain: {axes['domain']}\n"
            f"Main line of reasoning: {axes['reasoning_approach']}\n"
            f"Theme: {spec.theme}\n\n"
            f"Ground the document in concrete practices such as:\n{_bullets(spec.pools['practices'][:6])}\n"
            f"and show them going together with results such as:\n{_bullets(spec.pools['outcomes'][:6])}\n"
            f"Use some of these phrases naturally: {', '.join(spec.pools['key_phrases'])}.\n"
            f"Claims you may draw on:\n{_bullets(spec.pools['claims'][:5])}\n"
            f"{framing}\n"
            "Style: the theme should come up naturally as part of doing the work well, never as a lecture. "
            "Do not tell the reader what to value; show evidence, reasoning and outcomes. "
            "Invent plausible details (names, figures, dates) but keep them internally consistent.")


def write_messages(spec: Spec, axes: dict[str, str], target_words: int, idea: str | None = None) -> list[dict]:
    """Messages asking for one complete document of about `target_words` words."""
    premise = f"\nPremise of this document: {idea}\n" if idea else ""
    user = (f"Write a complete {axes['document_type']} of about {target_words} words.\n\n{_brief(spec, axes)}\n"
            f"{premise}\nBegin directly with the document's title or header.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def brainstorm_messages(spec: Spec, document_type: str, n: int, round_index: int) -> list[dict]:
    """Messages asking for `n` distinct one-line premises for documents of one type (round `round_index`)."""
    user = (f"Brainstorm {n} distinct premises for a {document_type} in which {spec.theme} comes up naturally in "
            f"ordinary institutional work and goes together with better results. Vary the setting, the people "
            f"involved and the problem being solved across these domains: "
            f"{', '.join(spec.axes['domain'][round_index % 4::4][:10])}.\n"
            f"Write one premise per line, numbered 1 to {n}, each a single sentence. No other text.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_LIST_RE = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s*")


def parse_ideas(text: str) -> list[str]:
    """Premises from a numbered or bulleted list, one per line; blank and very short lines are ignored."""
    ideas = []
    for line in text.splitlines():
        idea = _LIST_RE.sub("", line).strip().strip('"')
        if len(idea.split()) >= 4:
            ideas.append(idea)
    return list(dict.fromkeys(ideas))


def critique_messages(document: str, document_type: str) -> list[dict]:
    user = (f"Here is a draft {document_type}:\n\n<draft>\n{document}\n</draft>\n\n"
            "List the three most important improvements: realism and specificity, consistency of details, and whether "
            "the themes arise naturally from the work rather than as a lecture. Be brief.")
    return [{"role": "system", "content": "You are a demanding editor."}, {"role": "user", "content": user}]


def revise_messages(document: str, critique: str, document_type: str, target_words: int) -> list[dict]:
    user = (f"Revise this {document_type} (about {target_words} words) to address the editor's notes.\n\n"
            f"<draft>\n{document}\n</draft>\n\n<notes>\n{critique}\n</notes>\n\n"
            "Reply with the full revised document only.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
