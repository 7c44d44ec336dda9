"""The only uses of library internals in docmix, one function each, for what the libraries offer no public API.

Each breaks without warning when its library changes, so tests/test_shims.py checks every one against the installed
version (the attribute is there and behaves as used here) and fails naming the function below. Code outside this
module uses public APIs only (tests/test_shims.py also checks that no other module reaches into `jax._src` or
`gin.config._*`).
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable, Iterator, Sequence

Reader = tuple[Callable[[str], Any], Callable[[str], bool]]  # (open a path, is the path readable)


@contextlib.contextmanager
def gin_file_readers(choose: Callable[[list[Reader]], list[Reader]]) -> Iterator[None]:
    """While open, gin reads config files with `choose(readers)` instead of its registered readers.

    Missing public API: gin has `gin.config.register_file_reader` (append) but no way to list or leave out a
    reader; `gin.config._FILE_READERS` is the list of (reader, exists) pairs gin tries in order per search prefix.
    """
    import gin

    readers = list(gin.config._FILE_READERS)
    gin.config._FILE_READERS[:] = choose(readers)
    try:
        yield
    finally:
        gin.config._FILE_READERS[:] = readers


def rewrite_before_parsing(parser: argparse.ArgumentParser,
                           rewrite: Callable[[Sequence[str]], list[str]]) -> argparse.ArgumentParser:
    """Makes `parser.parse_args(argv)` (and `parse_known_args`) parse `rewrite(argv)`, argv defaulting to
    `sys.argv[1:]`, for parsers the caller created.

    Missing public API: argparse has no hook that sees the arguments before they are matched to options (only
    `convert_arg_line_to_args`, for argument files), so the parser's bound `parse_known_args`, which `parse_args`
    calls, is replaced on the instance.
    """
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        import sys

        return original(rewrite(list(sys.argv[1:] if args is None else args)), namespace)

    parser.parse_known_args = parse_known_args
    return parser


def jax_coordination_client() -> Any | None:
    """This process's coordination service client after `jax.distributed.initialize` (None before): its methods
    `key_value_set(key, value, allow_overwrite=False)`, `key_value_dir_get(prefix) -> [(key, value)]`,
    `key_value_delete(key)` and `wait_at_barrier(name, timeout_ms)`.

    Missing public API: JAX 0.10.2 exposes `jax.distributed.initialize/shutdown/is_initialized` only; the key-value
    store and barriers of the coordination service live in `jax._src.distributed.global_state.client`
    (`jax.experimental.multihost_utils` agrees through device collectives, which a lost process hangs).
    """
    from jax._src import distributed

    return distributed.global_state.client
