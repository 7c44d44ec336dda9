"""What docmix writes into a run directory (MODEL_DIR), and the check that MODEL_DIR is one, before anything is written.

A run directory holds the names in NAMES (docs/design.md "Run directory") and whatever its user puts beside them,
which docmix never reads, moves or deletes. MARKER is the first file a run writes into it after the writer lock
(`claim`); from then on the folder is a docmix run directory, and every later run resumes in it. A MODEL_DIR that
exists, holds anything, and is not a run directory (no MARKER) is refused by `check` before anything is written: it is
someone else's folder, even when it holds a `config.gin` and a `metrics.jsonl` of its own. Not refused: a folder
holding only what docmix writes before MARKER (START_UP: what a start-up killed before MARKER leaves, a TPU job's
state), and a run directory written before MARKER existed (its checkpoints/ hold docmix's metadata). `set_aside_metrics` keeps the metrics of an attempt that diverged, as
trainer.checkpoint_health keeps the checkpoints it does not resume.
"""
from __future__ import annotations

import fnmatch
import json
import time

import exit_codes
import storage
from storage import Path
from trainer import metrics_file, probes_in_loop

MARKER = "docmix_run.json"
METRICS, METRICS_SET_ASIDE = "metrics.jsonl", "metrics_set_aside"
LOGS = (METRICS, probes_in_loop.FILE)  # the records a resumed run truncates to the step it resumes from
NAMES = ("config.gin", *LOGS, METRICS_SET_ASIDE, "tb", "tokenizer", "checkpoints",
         "checkpoints_set_aside", "writer.lock", "hf", "exports", "eval", "launch", MARKER)
# What docmix writes into MODEL_DIR before MARKER: the writer lock (run_lock), pod_start's check file, and the job
# state and logs of launch.job, which runs train.py on a TPU VM.
START_UP = ("writer.lock", "writer.lock.*.tmp", ".docmix_shared_check.*", "launch")
SHOWN = 5  # foreign entries named in the error


class ForeignModelDir(FileExistsError):
    """MODEL_DIR holds files that docmix did not write."""
    exit_code = exit_codes.USAGE


def check(model_dir: str) -> None:
    """Raises ForeignModelDir when `model_dir` exists, is not empty and is not a docmix run directory. On an object
    store the listing it makes is not kept in fsspec's listing cache: the cache would hide files that other processes
    write there next (trainer.pod_start's check file)."""
    try:
        _check(model_dir)
    finally:
        if storage.is_remote(model_dir):
            fs, prefix = storage.filesystem(model_dir)
            fs.invalidate_cache(prefix)


def _check(model_dir: str) -> None:
    path = Path(model_dir)
    if not path.is_dir() or (path / MARKER).exists():
        return
    entries = sorted(p.name for p in path.iterdir())
    foreign = [n for n in entries if not any(fnmatch.fnmatchcase(n, pattern) for pattern in START_UP)]
    if not foreign or _has_docmix_checkpoints(path):
        return
    shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
    raise ForeignModelDir(f"MODEL_DIR={model_dir} holds files docmix did not write ({shown}): it is not a docmix run "
                          f"directory (no {MARKER}), so nothing was written into it. Choose a new or empty folder for "
                          "MODEL_DIR, or the run directory of the docmix run to resume")


def claim(model_dir: str) -> None:
    """Makes `model_dir` a run directory (creates it and writes MARKER), after `check`; nothing when it is one."""
    check(model_dir)
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).exists():
        (path / MARKER).write_text(json.dumps({"format": "docmix run directory", "contents": list(NAMES),
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                              indent=1) + "\n")


def set_aside_metrics(model_dir: str | Path, step: int, reason: str) -> Path | None:
    """Copies metrics.jsonl and probes.jsonl (each with its parts not yet composed, on gs://: trainer.metrics_file)
    into METRICS_SET_ASIDE/<step>/ with `reason` in reason.txt (a run that diverged at `step`: its rerun truncates
    both to the step it resumes from, as after a kill, and may train on with other settings); None when there are no
    metrics. A folder of an earlier attempt that diverged at the same step is kept: the copy goes to <step>-2,
    <step>-3, ... `metrics_file.read` reads a copy as it reads the original."""
    files = {name: storage.list_files(metrics_file.parts_dir(Path(model_dir) / name)) for name in LOGS}
    present = [name for name, parts in files.items() if parts or (Path(model_dir) / name).exists()]
    if METRICS not in present:
        return None
    folder, n = Path(model_dir) / METRICS_SET_ASIDE / str(step), 1
    while folder.exists():
        n += 1
        folder = folder.parent / f"{step}-{n}"
    folder.mkdir(parents=True)
    for name in present:
        source = Path(model_dir) / name
        if source.exists():
            (folder / name).write_bytes(source.read_bytes())
        if files[name]:
            copy = metrics_file.parts_dir(folder / name)
            copy.mkdir()
            for part in files[name]:
                (copy / part).write_bytes((metrics_file.parts_dir(source) / part).read_bytes())
    (folder / "reason.txt").write_text(reason + "\n")
    return folder


def _has_docmix_checkpoints(path: Path) -> bool:
    """A run directory written before MARKER: a checkpoint step holding docmix's metadata item."""
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir():
        return False
    for step in checkpoints.iterdir():
        meta = step / "metadata" / "metadata"
        if step.name.isdigit() and meta.is_file():
            try:
                return "model_config" in json.loads(meta.read_text())
            except ValueError:
                return False
    return False
