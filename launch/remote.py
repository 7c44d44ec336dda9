"""What runs on the workers: the code archive copied to them and the shell commands `launch.tpu` sends over SSH.

Every remote command is one string for the worker's shell, built here; each value in it is quoted with `shlex`, so
paths and train.py arguments holding spaces, quotes or `$(...)` arrive unchanged. `$HOME` is the only word the
worker's shell expands. Each command can be sent again after a dropped connection: set-up and unpacking are
idempotent, and a job is started at most once per launch id.
"""
from __future__ import annotations

import fnmatch
import os
import pathlib
import shlex
import subprocess
import tarfile
from collections.abc import Sequence

import repo

REMOTE_DIR = "$HOME/docmix"
ARCHIVE = "docmix.tar.gz"
# Everything a gs:// run needs on a TPU VM: the TPU runtime and the GCS filesystem client.
REQUIREMENTS = ("requirements-tpu.txt", "requirements-gcs.txt")


def code_files(root: pathlib.Path = repo.ROOT) -> list[str]:
    """The repository's files, committed or not, less what .gitignore excludes (runs, caches, venvs stay home): `git
    ls-files --cached --others --exclude-standard` in a git checkout; elsewhere (a release tarball, a copied tree)
    every file not excluded by the top-level .gitignore."""
    if (root / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                                check=True, capture_output=True).stdout
        return [name for name in listed.decode().split("\0") if name and (root / name).is_file()]
    patterns = [line.strip() for line in (root / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")] if (root / ".gitignore").is_file() else []

    def ignored(rel: pathlib.PurePosixPath) -> bool:
        for pattern in [*patterns, ".git/"]:
            anchored, body = pattern.startswith("/"), pattern.strip("/")
            candidates = [str(rel)] if anchored else [rel.name]
            if any(fnmatch.fnmatch(c, body) for c in candidates):
                return True
        return False

    files = []
    for folder, dirs, names in os.walk(root):
        base = pathlib.PurePosixPath(pathlib.Path(folder).relative_to(root).as_posix())
        dirs[:] = sorted(d for d in dirs if not ignored(base / d))
        files += [str(base / n) if str(base) != "." else n for n in sorted(names) if not ignored(base / n)]
    return files


def code_archive(destination: pathlib.Path, root: pathlib.Path = repo.ROOT) -> pathlib.Path:
    """A .tar.gz of the repository's files (`code_files`) as they are in the working tree."""
    with tarfile.open(destination, "w:gz") as tar:
        for name in code_files(root):
            tar.add(root / name, arcname=name)
    return destination


def unpack_command() -> str:
    """Unpacks the copied archive into REMOTE_DIR, replacing its code files (the venv and job logs stay)."""
    return f'mkdir -p "{REMOTE_DIR}" && tar -xzf "$HOME/{ARCHIVE}" -C "{REMOTE_DIR}"'


def setup_command() -> str:
    """Python 3.11 (from the OS packages when missing), a venv and the pinned requirements with the TPU and GCS
    extras; skipped when the same requirement files were installed before (a VM set up by an earlier launch)."""
    files = " ".join(f'-r "{REMOTE_DIR}/{name}"' for name in REQUIREMENTS)
    every = " ".join(f'"{REMOTE_DIR}/{name}"' for name in ("requirements.txt", *REQUIREMENTS))
    stamp = f'"{REMOTE_DIR}/.venv/docmix-requirements"'
    return " && ".join([
        "set -e",
        f"want=$(cat {every} | sha256sum)",
        f"if [ -f {stamp} ] && [ \"$(cat {stamp})\" = \"$want\" ]; then echo requirements installed; exit 0; fi",
        "(command -v python3.11 >/dev/null || "
        "(sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv))",
        f'python3.11 -m venv "{REMOTE_DIR}/.venv"',
        f'"{REMOTE_DIR}/.venv/bin/pip" install -q --upgrade pip',
        f'"{REMOTE_DIR}/.venv/bin/pip" install -q {files}',
        f'echo "$want" > {stamp}',
    ])


def start_command(model_dir: str, launch_id: str, node: str, train_args: Sequence[str], heartbeat_s: float) -> str:
    """Starts `launch.job --detach` (it outlives this SSH session), at most once per launch id."""
    job = shlex.join([".venv/bin/python", "-m", "launch.job", "--detach", f"--model_dir={model_dir}",
                      f"--launch_id={launch_id}", f"--node={node}", f"--heartbeat_s={heartbeat_s:g}", "--",
                      *train_args])
    marker = shlex.quote(f"launch_logs/{launch_id}.started")
    out = shlex.quote(f"launch_logs/{launch_id}.out")
    return (f'cd "{REMOTE_DIR}" && mkdir -p launch_logs && if mkdir {marker} 2>/dev/null; then '
            f"{job} > {out} 2>&1 < /dev/null; fi; echo started {shlex.quote(launch_id)}")


def stop_command(launch_id: str, grace_s: float) -> str:
    """Stops the job of a launch id on a worker (SIGTERM, then SIGKILL after `grace_s`); nothing if none runs."""
    return f'cd "{REMOTE_DIR}" && ' + shlex.join([".venv/bin/python", "-m", "launch.job", "--stop",
                                                  f"--launch_id={launch_id}", f"--grace_s={grace_s:g}"])
