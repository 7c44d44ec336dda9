"""Append-only JSONL stores keyed by deterministic ids: the resumability of `generate`.

Each finished item is one `write()` of one complete line on an O_APPEND descriptor, then fsync, so a killed run
leaves at most one partial last line. Opening a store repairs exactly that case (the fragment is cut off and
reported) and refuses anything else (a malformed complete line or a duplicate id raises naming file:line), so a rerun
skips finished items and can never write an id twice.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

log = logging.getLogger("data.synth.store")


class StoreError(ValueError):
    pass


class JsonlStore:
    """`store.records` (id -> record) of what is already on disk; `store.add(record)` appends a new one."""

    def __init__(self, path: str | pathlib.Path, key: str = "id"):
        self.path, self.key = pathlib.Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        self.repaired_bytes = 0
        if self.path.exists():
            self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a run was killed mid-line: drop the fragment, the item will be redone
            self.repaired_bytes = len(data) - end
            log.warning(f"{self.path}: removed a partial last line ({self.repaired_bytes} bytes) left by an "
                        "interrupted run; that item will be generated again")
            os.truncate(self.path, end)
        for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise StoreError(f"{self.path}:{lineno}: invalid JSON ({err.msg}); fix or remove the line") from err
            key = record.get(self.key) if isinstance(record, dict) else None
            if not isinstance(key, str):
                raise StoreError(f"{self.path}:{lineno}: record has no string {self.key!r}")
            if key in self.records:
                raise StoreError(f"{self.path}:{lineno}: duplicate {self.key} {key!r}")
            self.records[key] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict[str, Any]) -> None:
        key = record[self.key]
        if key in self.records:
            raise StoreError(f"{self.path}: {self.key} {key!r} is already stored")
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self._fd)
        self.records[key] = record

    def close(self) -> None:
        os.close(self._fd)
