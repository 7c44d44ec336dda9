"""gin files and bindings, whatever they configure: the command-line flags, parsing with one-line errors, bound values.

T5X-style flags: `--gin_file=F [--gin_file=...] [--gin.KEY=VALUE ...] [--gin_search_paths=a,b]`. `parse` reads files
(local or through `storage`, e.g. a run's gs:// config.gin) then bindings into gin's global config, so a wrong file,
line or binding fails in one line naming it (`ConfigError`). Which configurables exist and what a run is made of is
the trainer's business (trainer.config); this module knows nothing of them.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import re
import tokenize
from typing import Any, Sequence

import gin

import shims
import storage

_SEARCH_PATHS: list[str] = []  # what `parse` added to gin's search path (gin's list only grows)


class ConfigError(ValueError):
    """A gin file, binding or value is wrong; the message names it."""


def add_gin_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--gin_file` (repeatable), `--gin_search_paths` (comma-separated) and `--gin.KEY=VALUE` bindings.

    `--gin.KEY=VALUE` is rewritten to `--gin_bindings "KEY = VALUE"` before argparse sees it (as T5X does), so
    `parser.parse_args()` returns `args.gin_file`, `args.gin_bindings` and `args.gin_search_paths`. A VALUE that is
    not a Python literal or gin reference (e.g. `--gin.MODEL_DIR=/tmp/run`) is taken as a string.
    """
    parser.add_argument("--gin_file", action="append", default=[], help="gin file; repeatable, later files win")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding 'KEY = VALUE'; repeatable. Shorter: --gin.KEY=VALUE, e.g. "
                             "--gin.TRAIN_STEPS=100 --gin.MIXTURE_WEIGHTS=\"{'replay': 0.9, 'synthetic': 0.1}\"")
    parser.add_argument("--gin_search_paths", type=lambda s: [p for p in s.split(",") if p], default=[],
                        help="comma-separated folders searched for gin files and includes (t5x_configs/ always is)")
    return shims.rewrite_before_parsing(parser, rewrite_gin_args)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`; other arguments unchanged."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            key, value = arg[len("--gin."):].split("=", 1)
            out.append(f"--gin_bindings={key} = {_literal_or_string(value)}")
        elif arg.startswith("--gin."):
            raise ConfigError(f"{arg}: expected --gin.KEY=VALUE")
        else:
            out.append(arg)
    return out


def _literal_or_string(value: str) -> str:
    text = value.strip()
    if text.startswith(("@", "%")) or text in ("None", "True", "False"):
        return text
    try:
        ast.literal_eval(text)
        return text
    except (ValueError, SyntaxError):
        return repr(text)


def gin_message(error: Exception) -> str:
    """gin's parse error as one line. A value that is not a literal (`nan`, a bare word) is named as such, not by the
    Python AST node gin's parser failed on."""
    text = str(error).strip()
    if isinstance(error, tokenize.TokenError):  # Python's tokenizer: an unclosed bracket or string
        text = f"{error.args[0]} (an unclosed bracket or quote)"
    token = re.search(r"Failed to parse token '([^']*)'( \([^)]*\))?", text)
    if token and "<ast." in text:
        where = token.group(2) or ""
        where = " (in --gin_bindings)" if where.startswith(" (line ") else where  # no file: a binding
        special = "NaN and infinity have no Python literal; " if token.group(1).lower() in ("nan", "inf") else ""
        text = (f"cannot parse {token.group(1)!r}{where}: {special}a value must be a Python literal (a number, "
                "string, list, tuple, dict, True, False or None), an @configurable or a %MACRO")
    return "gin: " + re.sub(r"\s*\n\s*", "; ", text)


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> None:
    """Clears gin's config, then parses the files (each searched in gin's search path, to which `search_paths` are
    added in order) and the bindings (later wins), without building anything. Raises ConfigError naming the file
    and line or the binding."""
    gin.clear_config()
    for path in search_paths:
        if path not in _SEARCH_PATHS:
            gin.add_config_file_search_path(path)
            _SEARCH_PATHS.append(path)
    try:
        with _quiet_search(), shims.gin_file_readers(_plain_files_only):
            gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
    except (ValueError, IOError, SyntaxError, tokenize.TokenError) as e:  # gin names the file and line
        raise ConfigError(gin_message(e)) from e


def bound(selector: str) -> Any:
    """After `parse`: the value bound to `selector` (`TrainConfig.model_dir`, `INIT_FROM/macro.value`) with macros
    resolved, or None when nothing binds it."""
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        return None
    while isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        value = gin.query_parameter(value.scoped_selector.split("/")[0] + "/macro.value")
    return value


def macros(config_text: str) -> set[str]:
    """The macros a gin config string binds (`NAME = value` at the start of a line): of `gin.config_str()`, every
    macro parsed; of `gin.operative_config_str()`, those some configurable used."""
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=", config_text, re.MULTILINE)}


def _plain_files_only(readers: list[shims.Reader]) -> list[shims.Reader]:
    """gin's readers for `parse`: the file system (gin's `open`), then URLs (a run's gs:// config.gin) through
    `storage`.

    gin's second reader treats `a/b.gin` as file b.gin of Python package `a`; when the working directory holds a plain
    folder of that name (the demo's own `./runs/` output, say) it finds a namespace package and crashes with a
    TypeError instead of moving on. docmix never ships configs inside Python packages, so that reader is left out.
    """
    return [(reader, exists) for reader, exists in readers if reader is open] + [
        (lambda path: storage.Path(path).open(), lambda path: storage.is_remote(path) and storage.Path(path).is_file())]


@contextlib.contextmanager
def _quiet_search():
    """gin's resource reader logs every search-path prefix it tries (a miss at ERROR); a real miss still raises."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.pathname.endswith("resource_reader.py")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
