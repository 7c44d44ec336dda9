"""What the chaos soak (tests/chaos.py) reads of a run directory: the moment a launch is at, the temporary folders
it left, the last logged step, how long a launch takes to start, and the user's files planted in and beside MODEL_DIR, which no launch may change."""
from __future__ import annotations

import json
import os
import pathlib
import random

USER_FILES = ("../notes.txt", "notes.txt", "exports/notes.txt", "exports/keep/data.bin")


def moment_on_disk(model_dir: pathlib.Path, started: float) -> str:
    """What the run is doing, as MODEL_DIR shows it: writing an export or a checkpoint, stepping (a metrics record of
    this launch), else starting up."""
    for folder in (model_dir, model_dir / "exports"):
        if _names(folder, lambda e: (".writing-" in e.name or ".replaced-" in e.name) and _since(e, started)):
            return "export"
    if _names(model_dir / "checkpoints", lambda e: "tmp" in e.name and _since(e, started)):
        return "checkpoint"
    metrics = model_dir / "metrics.jsonl"
    try:
        if metrics.stat().st_mtime >= started and metrics.stat().st_size:
            return "steps"
    except FileNotFoundError:
        pass
    return "start-up"


def _names(folder: pathlib.Path, keep) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if keep(e)]
    except FileNotFoundError:
        return []


def _since(entry: os.DirEntry, started: float) -> bool:
    """Made by this launch (a killed launch's leftovers are not what this one is doing)."""
    try:
        return entry.stat().st_mtime >= started
    except FileNotFoundError:
        return False


def leftovers(model_dir: pathlib.Path) -> list[str]:
    """Temporary folders of exports and checkpoint saves left in the run directory."""
    found = []
    for folder in (model_dir, model_dir / "exports", model_dir / "checkpoints"):
        found += [f"{folder.name}/{n}" for n in _names(folder, lambda e: e.name.startswith(".") or "tmp" in e.name)]
    return found


def logged_step(model_dir: pathlib.Path) -> int:
    try:
        lines = (model_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return 0


def write_user_files(model_dir: pathlib.Path, rng: random.Random) -> dict[str, bytes]:
    files = {}
    for name in USER_FILES:
        path = model_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        files[name] = rng.randbytes(64)
        path.write_bytes(files[name])
    return files


def missing_user_files(model_dir: pathlib.Path, files: dict[str, bytes]) -> list[str]:
    return [name for name, data in files.items()
            if not (model_dir / name).is_file() or (model_dir / name).read_bytes() != data]


def logged_losses(records: list[dict]) -> list[dict]:
    """Every record's losses (total and per component) and gradient norm."""
    return [{k: v for k, v in r.items() if k.startswith("loss") or k == "grad_norm"} for r in records]


def startup_seconds(model_dir: pathlib.Path) -> float:
    """Seconds from the reference launch's start to its first metrics record (from its log's timestamps)."""
    text = (model_dir.parent / "logs" / "process_0.err").read_text().splitlines()
    stamps = [line[:8] for line in text if line[:2].isdigit() and line[2:3] == ":"]
    first = next((line[:8] for line in text if " step 1 loss " in line), None)
    if not stamps or first is None:
        return 20.0
    seconds = lambda s: int(s[:2]) * 3600 + int(s[3:5]) * 60 + int(s[6:8])  # noqa: E731
    return max(5.0, (seconds(first) - seconds(stamps[0])) % 86400 + 3.0)  # + the imports before the first log line
