"""The floors of the house (docs/design.md, "Floors"): a module imports only from its own package, from a lower
floor, or from a floor-0 module; models/ and data/ share floor 1 and know nothing of each other. Every import
statement counts, at module level or inside a function; an upward one fails this test, naming the file and line."""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
FLOORS = {
    "storage": 0, "exit_codes": 0, "platforms": 0, "progress": 0, "host_memory": 0, "ginfiles": 0, "shims": 0,
    "repo": 0,
    "models": 1, "data": 1,
    "trainer": 2,
    "eval": 3, "launch": 3,
    "experiments": 4,
    "train": 5, "sweep": 5,
}


def upward_imports() -> list[tuple[str, int, str]]:
    """(file, line, imported module) of every import that leaves its package for the same or a higher floor (floor 0
    excepted: everyone may import it, and it imports only itself)."""
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
                if top in FLOORS and top != own and FLOORS[top] > 0 and FLOORS[top] >= FLOORS[own]:
                    found.append((rel, node.lineno, name))
    return found


def test_no_module_imports_from_its_own_floor_or_above():
    found = [f"{rel}:{line} imports {name}" for rel, line, name in upward_imports()]
    assert not found, "imports against the floors (docs/design.md):\n" + "\n".join(found)

