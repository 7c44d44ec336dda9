"""The repository speaks only of itself: no text in it names how the work was organised or a developer's machine.

Every text file git tracks (and every new one it does not ignore) is read. A measurement is dated and names its
hardware and commit ("2026-12-02, commit 0dacce9"), never a work session (numbered stops or issues), and no machine
is said to be on loan. Absolute paths of a developer's machine (home folders, the development checkout's folder, a temporary
folder's files) never appear in docs, results or code. The patterns are spelled so that this file does not match
them itself.
"""
from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "a work session": re.compile(r"\b(stop|issue)\s+#?[0-9]+\b", re.I),
    "a machine on loan": re.compile(r"\bl[e]nt\b", re.I),
    "a developer's absolute path": re.compile(r"(?<![\w.])/(w[o]rk|r[o]ot|h[o]me/[A-Za-z_][\w.-]*|U[s]ers/[\w.-]+)/"),
    "a temporary folder's file": re.compile(r"(?<![\w.])/t[m]p/[^\s'\"`)]*"),
}
# Placeholders in a temporary folder that nothing reads or keeps: MODEL_DIR values in tests and bench scripts whose
# runs never write, the example of an unquoted path binding in docs/training.md and trainer/config.py, and
# bench/demo_device.py's default scratch folder.
ALLOWED_TMP = re.compile(r"/t[m]p/(x|x y|unused|run|bench|bench_compile|demo_device_models)$")


def repository_texts() -> list[pathlib.Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}): the tracked files are unknown")
    return [REPO / name for name in out.split("\0") if name and (REPO / name).is_file()]


def findings(path: pathlib.Path, text: str) -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            for match in pattern.finditer(line):
                if what == "a temporary folder's file" and ALLOWED_TMP.match(match.group(0)):
                    continue
                found.append(f"{path.relative_to(REPO)}:{lineno}: {what}: {match.group(0)!r} in {line.strip()[:120]!r}")
    return found


def test_no_work_sessions_lent_machines_or_developer_paths():
    found = []
    for path in repository_texts():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # images, gzip: not text
            continue
        found += findings(path, text)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line, what", [
    ("Results (st" "op 19; all 15 runs)", "a work session"), ("asked for by Iss" "ue #12", "a work session"),
    ("ran on a l" "ent H100", "a machine on loan"), ("--other_repo /w" "ork/main", "a developer's absolute path"),
    ("cache in /r" "oot/.cache/x", "a developer's absolute path"), ("see /h" "ome/alice/runs", "a developer's absolute path"),
    ("wrote /t" "mp/pytest-of-root/x/out", "a temporary folder's file"),
])
def test_the_patterns_catch_what_they_are_for(line, what, tmp_path):
    assert [f.split(": ")[1] for f in findings(REPO / "x.md", line)] == [what]


@pytest.mark.parametrize("line", ["MODEL_DIR = '/t" "mp/x'", "a stop condition", "issue a warning", "run 12 steps",
                                  "gs://bucket/work/x", "./root/x", "excellent", "the relentless"])
def test_ordinary_text_passes(line):
    assert findings(REPO / "x.md", line) == []
