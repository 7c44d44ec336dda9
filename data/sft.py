"""SFT records -> chat-template text pieces, trainable exactly on the assistant turns.

Records: chat `{"messages": [{"role": ..., "content": ...}, ...]}` or Alpaca `{"instruction", "input", "output"}`
(rendered as one user turn, instruction + blank line + input, and one assistant turn). The tokenizer's chat template is
rendered with a sandboxed jinja2 environment; the text each assistant turn adds is found by rendering the conversation
up to that turn with and without it, and the trainable piece is the assistant content plus the end-of-turn token that
follows it (whitespace after end-of-turn, and role headers, are not targets).
"""
from __future__ import annotations

from collections.abc import Sequence

from data.chat_template import compile_template
from data.records import BadRecord

ROLES = ("system", "user", "assistant", "tool")


def messages_of(record: dict, fmt: str) -> list[dict]:
    """The conversation in a chat or alpaca record; BadRecord when its fields are missing or mistyped."""
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise BadRecord(f"missing or non-string field {key!r}")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise BadRecord("field 'input' must be a string")
        prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("missing or empty field 'messages'")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise BadRecord(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    return messages


def has_assistant_text(messages: Sequence[dict]) -> bool:
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)


def render_pieces(messages: Sequence[dict], template: str, *, bos_text: str | None, eos_text: str | None
                  ) -> list[tuple[str, bool]]:
    """[(text, trainable), ...] whose concatenation is the template rendering of the whole conversation."""
    tmpl = compile_template(template)
    special = {"bos_token": bos_text or "", "eos_token": eos_text or ""}

    def render(msgs, gen_prompt):
        return tmpl.render(messages=list(msgs), add_generation_prompt=gen_prompt, **special)

    full = render(messages, False)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        after = render(messages[:i + 1], False)
        if not (full.startswith(before) and full.startswith(after)):
            raise BadRecord("chat template does not render conversations incrementally; cannot locate turn "
                            f"{i}'s assistant text")
        start = after.find(m["content"], len(before)) if m["content"] else len(before)
        if start < 0:
            raise BadRecord(f"chat template rewrote the assistant content of messages[{i}]")
        end = start + len(m["content"])
        if eos_text and after.startswith(eos_text, end):
            end += len(eos_text)
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [p for p in pieces if p[0]]
