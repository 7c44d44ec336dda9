"""Probe pairs: a probe set's records (`prompt`, `chosen`, `rejected`, `category`) and how a pair is encoded for
scoring, as a document (prompt and continuation encoded separately, after the tokenizer's special prefix) or, for
chat-style prompts (`User: ...\nAssistant:`), in the tokenizer's chat template."""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

from data.synth.records import read_jsonl
from eval import chat

PAIR_KEYS = ("prompt", "chosen", "rejected", "category")
CHAT_USER, CHAT_ASSISTANT = "User: ", "\nAssistant:"  # how the probe sets write a chat turn in plain text


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    category: str


def read_pairs(path: str | pathlib.Path) -> list[Pair]:
    """Reads a JSONL probe file; any malformed record is an error naming the file and record."""
    pairs = []
    for i, row in enumerate(read_jsonl(path, require=PAIR_KEYS), 1):
        if set(row) != set(PAIR_KEYS):
            raise ValueError(f"{path}: record {i}: want exactly the keys {list(PAIR_KEYS)}, got {sorted(row)}")
        bad = [k for k in PAIR_KEYS if not isinstance(row[k], str) or not row[k].strip()]
        if bad:
            raise ValueError(f"{path}: record {i}: {bad} must be non-empty strings")
        pairs.append(Pair(**row))
    if not pairs:
        raise ValueError(f"{path}: no probe pairs")
    return pairs


def special_prefix(tokenizer: chat.ChatTokenizer) -> list[int]:
    """Ids the tokenizer's post-processor puts before any text (e.g. BOS), which the model saw in training."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    return full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []


def encode_pair_texts(tokenizer: chat.ChatTokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """-> (ids of prefix + prompt + continuation, number of leading ids that are context, not scored).

    Prompt and continuation are encoded separately, so the scored tokens are exactly the continuation's tokens and
    are the same for `chosen` and `rejected` whatever the tokenizer merges across the boundary.
    """
    context = special_prefix(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)
    target = tokenizer.encode(continuation, add_special_tokens=False)
    if not target:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return context + target, len(context)


def chat_user_text(prompt: str) -> str | None:
    """The user message of a chat-style prompt (`User: TEXT\nAssistant:`), None for a document-style prompt."""
    if prompt.startswith(CHAT_USER) and prompt.endswith(CHAT_ASSISTANT):
        return prompt[len(CHAT_USER): -len(CHAT_ASSISTANT)]
    return None


def chat_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """The chat-style pairs of a set (those `--chat` scores)."""
    return [p for p in pairs if chat_user_text(p.prompt) is not None]


def encode_chat_texts(tokenizer: chat.ChatTokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Like `encode_pair_texts`, in the chat template: context = the template's rendering of the user turn with the
    assistant's generation prompt (it writes its own special tokens), target = the assistant's content (stripped),
    encoded separately so chosen and rejected share the context exactly."""
    user = chat_user_text(prompt)
    if user is None:
        raise ValueError(f"chat mode needs a chat-style prompt ({CHAT_USER!r}...{CHAT_ASSISTANT!r}), got {prompt!r}")
    context = tokenizer.encode_chat([{"role": "user", "content": user}])
    target = tokenizer.encode(continuation.strip(), add_special_tokens=False)
    if not target:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return context + target, len(context)
