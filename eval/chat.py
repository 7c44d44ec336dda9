"""A checkpoint's tokenizer with its chat template: encode, decode, render chat messages, end-of-sequence ids.

Reads only `tokenizer.json` (the `tokenizers` library), `tokenizer_config.json`, `chat_template.jinja` and
`generation_config.json`; the template is rendered in jinja2's immutable sandbox, as transformers does, because
chat templates are code that ships with a checkpoint.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers

import storage
from data.chat_template import compile_template, template_source
from data.tokenize import load_tokenizer, read_json


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict with "content"."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: Mapping[str, str]  # bos_token, eos_token, pad_token, unk_token -> text
    eos_ids: tuple[int, ...]
    source: storage.Path

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """Renders `messages` ([{"role", "content"}, ...]) with the checkpoint's chat template."""
        if self.chat_template is None:
            raise ValueError(
                f"{self.source} has no chat template (neither chat_template.jinja nor tokenizer_config.json "
                "'chat_template'); use plain prompts instead of chat messages"
            )
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message {i} needs 'role' and 'content', got keys {sorted(m)}")
        return compile_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        # The template writes the special tokens itself, so the tokenizer must not add more (transformers does the same).
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def load(tokenizer_dir: str | pathlib.Path, *, extra_eos_ids: Sequence[int] = ()) -> ChatTokenizer:
    """Loads the tokenizer of an HF folder or a run's `tokenizer/` folder (local or gs://).

    End-of-sequence ids are the union of `extra_eos_ids` (e.g. the model config's), generation_config.json's
    `eos_token_id` and the id of tokenizer_config.json's `eos_token`.
    """
    tokenizer_dir = storage.Path(tokenizer_dir)
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found (a docmix tokenizer folder needs tokenizer.json)")
    tokenizer = load_tokenizer(tokenizer_file)
    config = read_json(tokenizer_dir / "tokenizer_config.json")
    special = {
        name: text
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (text := _token_text(config.get(name))) is not None
    }
    eos = list(extra_eos_ids)
    generation_eos = read_json(tokenizer_dir / "generation_config.json").get("eos_token_id")
    if generation_eos is not None:
        eos += generation_eos if isinstance(generation_eos, list) else [generation_eos]
    if "eos_token" in special:
        eos_id = tokenizer.token_to_id(special["eos_token"])
        if eos_id is None:
            raise ValueError(f"{tokenizer_dir / 'tokenizer_config.json'}: eos_token {special['eos_token']!r} is not in the vocabulary")
        eos.append(eos_id)
    return ChatTokenizer(
        tokenizer=tokenizer,
        chat_template=template_source(tokenizer_dir, config),
        special_tokens=special,
        eos_ids=tuple(sorted(set(int(i) for i in eos))),
        source=tokenizer_dir,
    )
