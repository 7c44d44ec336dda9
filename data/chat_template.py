"""Chat templates, as Hugging Face tokenizers ship them: where to find one and how to render it safely.

A template is code that comes with a checkpoint, so it is rendered in jinja2's immutable sandbox (as transformers does),
with the globals and filters templates expect. Used by SFT rendering (`data.sft`) and by chat prompting (`eval.chat`).
"""
from __future__ import annotations

import datetime
import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in some templates; rendering keeps the body."""

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


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """A sandboxed jinja2 template with transformers' globals (`raise_exception`, `strftime_now`) and `tojson`."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def template_source(folder: pathlib.Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The chat template of a tokenizer folder: `chat_template.jinja` if present, else tokenizer_config.json's
    `chat_template` (a string, or named templates of which "default" is used); None when there is none."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
