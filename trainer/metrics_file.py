"""MODEL_DIR/metrics.jsonl on any storage, written in O(1) per record, and read back by every tool the same way.

Locally a record batch is a real append. An object store has no append, and rewriting the whole object per record is
quadratic over a run, so on gs:// a batch is written as one new part object and then composed onto metrics.jsonl
(GCS compose: server-side concatenation, no bytes re-sent), after which the part is deleted: three requests per batch
whatever the length of the run. Layout:

    MODEL_DIR/metrics.jsonl                  the records composed so far, one JSON object per line, steps increasing
    MODEL_DIR/metrics.jsonl.parts/<n>.jsonl  records written but not (yet) composed: normally none; a part is left
                                             when a compose fails (retried with the next batch) or the writer dies
                                             between its compose and its delete

`read` returns metrics.jsonl's records, then those of the parts in order whose step is past the last one seen (so a
part that was composed but not deleted is not counted twice). A kill while records are appended (locally; an object
is stored whole, but one copied from such a file is read alike) leaves a torn record: the last line of its file,
without its newline. Readers drop it with a warning naming the file; any other malformed line is an error naming the
file and line (`parse`). `truncate_after` rewrites metrics.jsonl once, at the start of a resumed run, and removes the
parts.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import storage

log = logging.getLogger(__name__)
NAME = "metrics.jsonl"  # in MODEL_DIR
PARTS_SUFFIX = ".parts"
COMPOSE_MAX = 32  # GCS composes at most 32 source objects per request
READ_ROUNDS = 5   # a reader racing the writer's compose-and-delete starts over at most this often


def parts_dir(path: storage.PathLike) -> storage.Path:
    return storage.Path(f"{path}{PARTS_SUFFIX}")


def _lines(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class MetricsFile:
    """Appends record batches to a metrics.jsonl (local or on an object store, see the module doc). Not thread-safe:
    one writer per file (trainer.metrics.Sinks' thread, after `truncate_after`)."""

    def __init__(self, path: storage.PathLike):
        self.path = storage.Path(path)
        self.remote = storage.is_remote(path)
        if self.remote:
            self.fs, self.name = storage.filesystem(path)
            _, self.parts = storage.filesystem(parts_dir(path))
            self.pending: list[str] = []  # parts written, not yet composed
            # Numbered after any part an earlier writer left (truncate_after, called first by Sinks, folds them in).
            self.next = 1 + max((int(n.split(".")[0]) for n in storage.list_files(parts_dir(path))), default=0)
            self.head = self.fs.exists(self.name)
            self.compose_failed = False

    def append(self, records: list[dict[str, Any]]) -> None:
        """Writes `records` after those already there; returns once they are stored (in metrics.jsonl, or in a part
        that `read` sees when composing it failed: retried with the next batch and by `compose`). Raises, having
        written nothing, when they could not be stored."""
        if not records:
            return
        if not self.remote:
            with self.path.open("a") as f:
                f.write(_lines(records))
            return
        part = f"{self.parts}/{self.next:012d}.jsonl"
        self.fs.pipe_file(part, _lines(records).encode())
        self.next += 1
        self.pending.append(part)
        try:
            self.compose()
        except Exception as e:  # noqa: BLE001 - the records are stored in their part either way
            if not self.compose_failed:
                log.warning("%s: could not append record parts to it (%s); they stay under %s, where readers find "
                            "them, and are appended with the next records", self.path, e, parts_dir(self.path))
            self.compose_failed = True
        else:
            self.compose_failed = False

    def compose(self) -> None:
        """Composes the pending parts onto metrics.jsonl (a batch of at most 31 per request), then deletes them."""
        while self.pending:
            batch = self.pending[:COMPOSE_MAX - 1]
            self.fs.merge(self.name, [self.name] * self.head + batch)
            self.head = True
            self.fs.rm(batch)
            del self.pending[:len(batch)]
        self.fs.invalidate_cache(self.name)


def read(path: storage.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (local or gs://, with its parts not yet composed), in the order written. A
    malformed record is an error naming the file and line, except a torn one (`parse`), which is dropped with a
    warning. Safe while a run writes: a part composed and deleted between the listing and its read sends the reader
    round again (its records are then in metrics.jsonl)."""
    path = storage.Path(path)
    for attempt in range(READ_ROUNDS):
        try:
            records = parse(path, path.read_bytes()) if path.exists() else []
            for name in storage.list_files(parts_dir(path)):
                part = parts_dir(path) / name
                for record in parse(part, part.read_bytes()):
                    if not records or record["step"] > records[-1]["step"]:
                        records.append(record)
        except FileNotFoundError:
            if attempt + 1 == READ_ROUNDS:
                raise
            continue
        return records


def parse(path: storage.Path, data: bytes) -> list[dict[str, Any]]:
    """The records in `data`, the bytes of metrics.jsonl or of one part. Each line must be a JSON object with a
    'step', or it is an error naming `path` and the line; except the last line when no newline ends it and it does
    not parse: a write cut short (a kill while appending; every record is written with its newline), dropped with a
    warning naming the file and line, once per process."""
    lines = data.split(b"\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:  # also a line that is not UTF-8
            if lineno == len(lines):
                _warn_torn(path, lineno, len(line))
                break
            raise ValueError(f"{path}:{lineno}: invalid JSON ({getattr(err, 'msg', err)})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if "step" not in record:
            raise ValueError(f"{path}:{lineno}: record lacks ['step']")
        records.append(record)
    return records


_warned: set[tuple[str, int]] = set()


def _warn_torn(path: storage.Path, lineno: int, size: int) -> None:
    if (str(path), lineno) not in _warned:
        _warned.add((str(path), lineno))
        log.warning("%s:%d: dropped a partial last record (%d bytes, no newline: a write cut short, e.g. by a "
                    "kill); the records before it are read", path, lineno, size)


def truncate_after(path: storage.PathLike, step: int) -> None:
    """Drops records past `step` (written by a run that died after its last checkpoint, then redone on resume) and a
    torn last record (`parse`): the file is rewritten once, whole (atomically), and its parts removed."""
    path = storage.Path(path)
    parts = storage.list_files(parts_dir(path))
    if not path.exists() and not parts:
        return
    keep = [r for r in read(path) if r["step"] <= step]
    with storage.atomic_write(path) as f:
        f.write(_lines(keep))
    for name in parts:
        (parts_dir(path) / name).unlink()
