"""shims.py against the installed gin, argparse and JAX: each check fails naming the shim whose library internals
moved, and no other module reaches into those internals. (The coordination client's methods, on a real service:
tests/test_coordination.py.)"""
from __future__ import annotations

import argparse
import ast
import io
import pathlib
import sys

import gin
import pytest

import shims

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_gin_file_readers_chooses_what_gin_reads_and_restores_gins_list():
    where = "shims.gin_file_readers: gin.config._FILE_READERS"
    before = getattr(gin.config, "_FILE_READERS", None)
    assert isinstance(before, list) and before[0][0] is open, f"{where} is no longer gin's list of (reader, exists)"
    saved = list(before)
    served = ("a_gin_file_only_this_reader_has.gin", "SHIM_CHECK = 7\n")

    def choose(readers):
        assert readers == saved, f"{where}: the readers passed to `choose` are not gin's"
        return [(lambda path: io.StringIO(served[1]), lambda path: path.endswith(served[0]))]

    gin.clear_config()
    with shims.gin_file_readers(choose):
        assert gin.config._FILE_READERS is before and len(before) == 1
        gin.parse_config_file(served[0])
    assert gin.query_parameter("SHIM_CHECK/macro.value") == 7, f"{where}: gin did not read through the chosen reader"
    assert gin.config._FILE_READERS == saved, f"{where}: gin's readers were not restored"
    gin.clear_config()


@pytest.mark.parametrize("through_sys_argv", [False, True])
def test_rewrite_before_parsing_sees_every_argument_parse_args_gets(monkeypatch, through_sys_argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", action="append", default=[])
    shims.rewrite_before_parsing(parser, lambda argv: [a.replace("--y", "--x") for a in argv])
    if through_sys_argv:
        monkeypatch.setattr(sys, "argv", ["prog", "--y=1", "--x=2"])
    args = parser.parse_args(None if through_sys_argv else ["--y=1", "--x=2"])
    assert args.x == ["1", "2"], ("shims.rewrite_before_parsing: argparse's parse_args no longer goes through the "
                                  "instance's parse_known_args")


def test_jax_coordination_client_is_none_before_jax_distributed_starts():
    assert shims.jax_coordination_client() is None, \
        "shims.jax_coordination_client: jax._src.distributed.global_state.client moved or is set before initialize"


def private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each import of jax._src and each `gin.config._NAME` in a module."""
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [(node.lineno, n) for n in names if n == "jax._src" or n.startswith("jax._src.")]
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and isinstance(node.value, ast.Attribute)
                and node.value.attr == "config" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "gin"):
            found.append((node.lineno, f"gin.config.{node.attr}"))
    return found


def test_no_module_but_shims_uses_private_jax_or_gin_apis():
    assert private_uses(ast.parse("from jax._src import distributed\nimport jax._src.x\ngin.config._CONFIG\n")) == [
        (1, "jax._src"), (2, "jax._src.x"), (3, "gin.config._CONFIG")]
    found = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "shims.py" or rel.startswith(("tests/", ".venv/", "cache/", "shared/")):
            continue
        found += [f"{rel}:{line} uses {what}" for line, what in private_uses(ast.parse(path.read_text(), rel))]
    assert not found, "private JAX/gin APIs outside shims.py:\n" + "\n".join(found)
