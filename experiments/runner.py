"""Running train.py for each run: locally in sequence, or through a launcher command template. No shell anywhere:
every command is an argument list. Finished runs are skipped; an interrupted run is started again with the same
command, and train.py resumes it from its MODEL_DIR."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

import repo
import storage

PLACEHOLDERS = ("{name}", "{model_dir}")
CMD = "{cmd}"
ARGS = "{args}"
STATUS_FILE = "status.json"


@dataclasses.dataclass(frozen=True)
class Job:
    """One train.py invocation: its name (run name), run directory, final step and train.py arguments; `export`:
    it ends with an HF export (MODEL_DIR/hf)."""
    name: str
    model_dir: storage.Path  # local or gs://
    train_steps: int
    args: tuple[str, ...]
    export: bool = True


def completed_step(model_dir: storage.Path) -> int | None:
    """The step of the run's latest committed checkpoint, None when it has none."""
    if not (model_dir / "checkpoints").is_dir():
        return None
    from trainer import checkpoint

    try:
        return checkpoint.read_metadata(model_dir)[2]
    except FileNotFoundError:
        return None


def is_done(job: Job) -> bool:
    """Finished: a committed checkpoint at the final step and the end-of-run HF export (when it makes one)."""
    step = completed_step(job.model_dir)
    return step is not None and step >= job.train_steps and (
        not job.export or (job.model_dir / "hf" / "config.json").is_file())


def command(job: Job, launcher: str | None) -> list[str]:
    """The argument list that runs a job: `python train.py ARGS` here, or the launcher template with `{cmd}` (a whole
    word) replaced by `python train.py ARGS`, or `{args}` (a whole word) by ARGS alone (what `launch.tpu` takes after
    `--`), and `{name}` / `{model_dir}` substituted inside words."""
    if launcher is None:
        return [sys.executable, str(repo.ROOT / "train.py"), *job.args]
    template = shlex.split(launcher)
    if template.count(CMD) + template.count(ARGS) != 1:
        raise ValueError(f"--launcher {launcher!r}: needs `{CMD}` or `{ARGS}` exactly once, as a separate word")
    out: list[str] = []
    for token in template:
        if token in (CMD, ARGS):
            out += (["python", "train.py"] if token == CMD else []) + list(job.args)
            continue
        if CMD in token or ARGS in token:
            raise ValueError(f"--launcher: `{CMD}` / `{ARGS}` must be a separate word, got {token!r}")
        out.append(token.replace("{name}", job.name).replace("{model_dir}", str(job.model_dir)))
    return out


def run_all(jobs: Sequence[Job], out_dir: storage.Path, *, launcher: str | None = None,
            env: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Runs every job that is not finished, in order; one failure does not stop the others.

    Returns and saves (out_dir/status.json) {name: {"status": "done" | "failed", "returncode", "log"}}; each job's
    output goes to out_dir/logs/<name>.log (local or gs://: `_job_log`). Runs share a persistent JAX compilation
    cache (out_dir/jax_cache for a local out_dir, a local cache folder for a gs:// one, unless
    JAX_COMPILATION_CACHE_DIR is set), so runs of one shape compile once.
    """
    env = dict(os.environ if env is None else env)
    cache = storage.cache_dir("jax_cache") if storage.is_remote(out_dir) else out_dir / "jax_cache"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status_path = out_dir / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    for i, job in enumerate(jobs, 1):
        if is_done(job):
            print(f"[{i}/{len(jobs)}] {job.name}: finished, skipped", flush=True)
            status[job.name] = {"status": "done", "returncode": 0, "log": status.get(job.name, {}).get("log")}
            continue
        resumed = completed_step(job.model_dir)
        print(f"[{i}/{len(jobs)}] {job.name}: " + (f"resuming from step {resumed}" if resumed else "training"),
              flush=True)
        log = logs / f"{job.name}.log"
        with _job_log(log) as f:
            proc = subprocess.run(command(job, launcher), cwd=repo.ROOT, env=env,
                                  stdout=f, stderr=subprocess.STDOUT)
        done = proc.returncode == 0 and is_done(job)
        status[job.name] = {"status": "done" if done else "failed", "returncode": proc.returncode, "log": str(log)}
        if not done:
            print(f"    {job.name} did not finish (exit {proc.returncode}); see {log}", flush=True)
        status_path.write_text(json.dumps(status, indent=2) + "\n")
    return status


@contextlib.contextmanager
def _job_log(log: storage.Path) -> Iterator[IO]:
    """A file for a job's output that ends up appended to `log`: `log` itself when local; a local temporary file
    whose bytes are appended to a gs:// `log` once the job ends (an object store has no append: the object is
    rewritten once per job)."""
    if not storage.is_remote(log):
        with log.open("ab") as f:
            yield f
        return
    with tempfile.TemporaryFile() as f:
        try:
            yield f
        finally:
            f.seek(0)
            log.write_bytes((log.read_bytes() if log.exists() else b"") + f.read())
