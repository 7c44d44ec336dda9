"""The README's quick start on a fresh machine, for real: its line, as written, in a fresh checkout and a shell with no
virtual environment, creates .venv with python3.11 and installs requirements.txt from the package registry, then
runs the demo (scaled down like every documented train.py run, tests/test_docs_commands.py). In the venv it leaves:
`pip check` is clean; every module imports, or (needing an optional extra) says which requirements file to install;
and the test modules that need an extra, run there, are all skipped, each naming its requirements file.

The README's other line, the test command, is what CI runs first, as written, in its own clean venv (.ci/run); this
test is the part of a fresh machine that the suite itself can check. It needs the registry (skipped without it
unless DOCMIX_REQUIRE_PYPI=1, as in CI) and python3.11.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from tests.doc_commands import REPO, Shell, checkout, readme_command, user_env
from tests.test_docs_commands import scale

PROBE = "gin-config==0.5.0"  # one small pinned requirement: is the registry reachable?
IMPORT_ALL = r"""
import importlib, pathlib
bad = []
for path in sorted(pathlib.Path(".").glob("*.py")) + sorted(pathlib.Path(".").glob("[a-z]*/**/*.py")):
    if path.parts[0] in ("tests", "bench") or path.name in ("__main__.py", "conftest.py"):
        continue
    name = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
    try:
        importlib.import_module(name)
    except ImportError as e:
        if "pip install -r requirements-" not in str(e):
            bad.append(f"{name}: {type(e).__name__}: {e}")
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
print("\n".join(bad) or "all modules import")
"""


def unavailable(reason: str) -> None:
    if os.environ.get("DOCMIX_REQUIRE_PYPI") == "1":
        pytest.fail(f"DOCMIX_REQUIRE_PYPI=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.mark.slow  # ~3 min on an idle 2-core machine with an empty pip cache: the install is most of it
def test_quick_start_in_a_clean_venv(tmp_path):
    python311 = shutil.which("python3.11")
    if python311 is None:
        unavailable("python3.11 is not on PATH")
    probe = subprocess.run([python311, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path / "probe"),
                            PROBE], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        unavailable(f"the package registry is not reachable (pip download {PROBE}: {probe.stderr.strip()[-300:]})")
    root = checkout(tmp_path)
    # A fresh user's shell, but with this machine's pip download cache and demo assets (only faster, not different).
    pip_cache = os.environ.get("PIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pip")
    env = {k: v for k, v in user_env(tmp_path / "home").items() if not k.startswith(("JAX_", "XLA_", "DOCMIX_"))}
    shell = Shell(root, {**env, "PIP_CACHE_DIR": pip_cache,
                         "DOCMIX_CACHE": os.environ.get("DOCMIX_CACHE", str(REPO / "cache"))})

    line = scale(readme_command("train.py"))
    proc = shell.run(line, timeout=1800)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "stopped at step 2 (done)" in proc.stdout and (root / "runs" / "demo" / "hf" / "config.json").is_file()

    check = shell.run("pip check")
    assert check.returncode == 0, check.stdout + check.stderr
    imports = shell.run(f"python -c {shlex.quote(IMPORT_ALL)}")
    assert imports.returncode == 0 and imports.stdout.strip() == "all modules import", imports.stdout + imports.stderr

    needing = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                     if re.search(r"^pytestmark = extras\.require\(", p.read_text(), re.M))
    assert len(needing) >= 4, needing
    pytest_pin = re.search(r"^pytest==\S+", (REPO / "requirements-test.txt").read_text(), re.M).group(0)
    tests = shell.run(f"pip install -q {pytest_pin} && python -m pytest -q -rs -p no:cacheprovider {' '.join(needing)}")
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    # Exit 5 is pytest's "no tests collected": every module skipped itself on import, before collecting a test.
    assert tests.returncode in (0, 5) and re.fullmatch(r"\d+ skipped in .*", summary), tests.stdout[-1500:] + tests.stderr
    skips = [line for line in tests.stdout.splitlines() if line.startswith("SKIPPED")]
    assert sum(int(re.search(r"\[(\d+)\]", s).group(1)) for s in skips) == len(needing), skips  # [n] per reason
    assert all("pip install -r requirements-" in s for s in skips), skips
