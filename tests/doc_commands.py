"""The commands the docs give, the fresh checkout they run in, and the shell a user types them into.

Standard library only: `.ci/run` reads the README's test command through `readme_command` before any package is
installed, so that CI runs exactly the line the README shows.

- `doc_commands(path)`: every line of a markdown file's ```bash blocks, `\\` continuations joined, comments dropped
  (```text blocks are synopses and are not commands).
- `checkout(tmp)`: the repository's files as a fresh clone has them (`git ls-files`), nothing else.
- `Shell`: runs one command line after another the way one interactive shell would: what a line exports or activates
  (`export`, `. .venv/bin/activate`) is there for the next line, and nothing else is. It starts from a PATH without
  any virtual environment, so `python` is whatever the machine has until the quick start activates its venv.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)


def doc_commands(path: pathlib.Path) -> list[str]:
    """The commands of a markdown file's ```bash blocks, one per line after joining `\\` continuations."""
    commands = []
    for match in FENCE.finditer(path.read_text()):
        if match.group(2) != "bash":
            continue
        for line in match.group(3).replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())  # trailing comments (none of the commands quote a '#')
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def readme_command(containing: str) -> str:
    """The one README command containing `containing`: the quick start ("train.py"), the tests ("-m pytest")."""
    found = [c for c in doc_commands(README) if containing in c and "python3.11 -m venv" in c]
    if len(found) != 1:
        raise ValueError(f"README.md: expected one venv command containing {containing!r}, found {found}")
    return found[0]


def checkout(tmp: pathlib.Path) -> pathlib.Path:
    """A copy of the repository's files as a fresh clone has them (tracked, and new files git does not ignore)."""
    root = tmp / "docmix"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def is_venv_bin(folder: str) -> bool:
    return (pathlib.Path(folder) / "activate").is_file() or (pathlib.Path(folder).parent / "pyvenv.cfg").is_file()


def user_env(home: pathlib.Path, **extra: str) -> dict[str, str]:
    """This process's environment as a new user's shell has it: no virtual environment on PATH or active, no pytest
    or API-key variables, HOME a fresh folder."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST", "OPENAI", "VIRTUAL_ENV", "XDG_CACHE_HOME")) and k != "PYTHONPATH"}
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and not is_venv_bin(p)]
    home.mkdir(parents=True, exist_ok=True)
    env.update(PATH=os.pathsep.join(path), HOME=str(home), **extra)
    return env


class Shell:
    """One user's shell in `cwd`: `run(line)` runs a line with bash and keeps the environment the line leaves."""

    FORGET = ("_", "SHLVL", "PWD", "OLDPWD")  # bash's own bookkeeping

    def __init__(self, cwd: pathlib.Path, env: dict[str, str]):
        self.cwd, self.env = cwd, dict(env)
        self.state = cwd.parent / f".shell-state-{id(self)}"

    def run(self, line: str, timeout: float = 900) -> subprocess.CompletedProcess:
        script = f"{line}\n__rc=$?\nenv -0 > {self.state}\nexit $__rc\n"
        proc = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if self.state.exists():
            pairs = (item.split("=", 1) for item in self.state.read_text().split("\0") if "=" in item)
            self.env = {k: v for k, v in pairs if k not in self.FORGET}
            self.state.unlink()
        return proc


def venv_link(root: pathlib.Path) -> None:
    """`root/.venv` as the venv the quick start makes: a link to this interpreter's venv (which has the packages)."""
    if not (pathlib.Path(sys.prefix) / "bin" / "activate").is_file():
        raise RuntimeError(f"the tests run in {sys.prefix}, not a venv: create one as README.md says")
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
