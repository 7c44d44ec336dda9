"""A checkpoint's tokenizer with its chat template: encode, decode, render chat messages, end-of-sequence ids.

Reads only `tokenizer.json` (the `tokenizers` library), `tokenizer_config.json`, `chat_template.jinja` and
`generation_config.json`; the template is rendered in jinja2's immutable sandbox, as transformers does, because
chat templates are code that ships with a checkpoint.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for SFT masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters, which changes the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict with "content"."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _chat_template_source(tokenizer_dir: pathlib.Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = tokenizer_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: Mapping[str, str]  # bos_token, eos_token, pad_token, unk_token -> text
    eos_ids: tuple[int, ...]
    source: pathlib.Path

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
    """Loads the tokenizer of an HF folder or a run's `tokenizer/` folder.

    End-of-sequence ids are the union of `extra_eos_ids` (e.g. the model config's), generation_config.json's
    `eos_token_id` and the id of tokenizer_config.json's `eos_token`.
    """
    tokenizer_dir = pathlib.Path(tokenizer_dir)
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found (a docmix tokenizer folder needs tokenizer.json)")
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    config = _read_json(tokenizer_dir / "tokenizer_config.json")
    special = {
        name: text
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (text := _token_text(config.get(name))) is not None
    }
    eos = list(extra_eos_ids)
    generation_eos = _read_json(tokenizer_dir / "generation_config.json").get("eos_token_id")
    if generation_eos is not None:
        eos += generation_eos if isinstance(generation_eos, list) else [generation_eos]
    if "eos_token" in special:
        eos_id = tokenizer.token_to_id(special["eos_token"])
        if eos_id is None:
            raise ValueError(f"{tokenizer_dir / 'tokenizer_config.json'}: eos_token {special['eos_token']!r} is not in the vocabulary")
        eos.append(eos_id)
    return ChatTokenizer(
        tokenizer=tokenizer,
        chat_template=_chat_template_source(tokenizer_dir, config),
        special_tokens=special,
        eos_ids=tuple(sorted(set(int(i) for i in eos))),
        source=tokenizer_dir,
    )
