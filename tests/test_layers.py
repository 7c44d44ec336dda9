"""The floors of the house (docs/design.md, "Floors"): a module imports only from its own package, from a lower
floor, or from a floor-0 module; models/ and data/ share floor 1 and know nothing of each other. Every import
statement counts, at module level or inside a function. The upward imports that remain are listed in KNOWN with the
reason they are still there; a new one fails this test, naming the file and line."""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
FLOORS = {
    "storage": 0, "exit_codes": 0, "platforms": 0, "progress": 0, "host_memory": 0,
    "models": 1, "data": 1,
    "trainer": 2,
    "eval": 3, "launch": 3,
    "experiments": 4,
    "train": 5, "sweep": 5,
}
# (importing file, imported package) -> why it is still there.
KNOWN = {
    ("data/preview.py", "trainer"): "reads the run's gin files into a RunConfig (gin parsing lives in trainer.config)",
    ("data/pretokenize.py", "trainer"): "the same gin parsing",
    ("models/convert.py", "trainer"): "hf-to-orbax and orbax-to-hf write and read trainer checkpoints and exports",
}


def upward_imports() -> list[tuple[str, int, str]]:
    """(file, line, imported module) of every import that leaves its package for the same or a higher floor."""
    found = []
    for path in sorted(REPO.glob("*.py")) + sorted(p for top in FLOORS for p in (REPO / top).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        own = rel.split("/")[0].removesuffix(".py")
        if own not in FLOORS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in FLOORS and top != own and FLOORS[top] >= FLOORS[own] and FLOORS[own] > 0:
                    found.append((rel, node.lineno, name))
    return found


def test_no_module_imports_from_its_own_floor_or_above():
    new = [f"{rel}:{line} imports {name}" for rel, line, name in upward_imports()
           if (rel, name.split(".")[0]) not in KNOWN]
    assert not new, "imports against the floors (docs/design.md):\n" + "\n".join(new)


def test_every_known_exception_still_exists():
    """A listed exception that was removed is taken off the list, so the list stays the truth."""
    present = {(rel, name.split(".")[0]) for rel, _, name in upward_imports()}
    assert set(KNOWN) <= present, sorted(set(KNOWN) - present)
