"""The JSONL / JSONL.gz reader: the lines of one data shard, found by position, never by parsing anyone else's.

- plain JSONL files: contiguous byte ranges of the files' concatenation; a line belongs to the range holding its
  first byte (local files are read in place through an mmap, remote ones streamed once into a local spill file);
- JSONL.gz files: whole files round-robin when there are at least `shards` of them, else line k of each file goes to
  shard k % shards (every shard then streams the whole file through the decompressor, but parses only its lines).
A line longer than the document limit is read past in pieces, never held whole, and reported as a BadRecord.
"""
from __future__ import annotations

import gzip
import io
import mmap
import os
import tempfile
import weakref
import zlib
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

import storage
from data.records import BadInputError, BadRecord, json_record, shard_range, too_large


class _CountingReader:
    """A binary file object that counts the bytes read through it."""

    def __init__(self, f: BinaryIO):
        self._f, self.count = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self._f.readline(size)
        self.count += len(data)
        return data


def _next_line(f: Any, limit: int) -> tuple[bytes | None, int, int]:
    """(the next line of binary file object `f`, bytes read, the line's length without its newline); (b"", 0, 0) at
    the end. A line longer than `limit` bytes comes back as None: it is read past in 64 KiB pieces, never held
    whole."""
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, len(line), len(line) - line.endswith(b"\n")
    size = len(line)
    while not line.endswith(b"\n"):
        line = f.readline(1 << 16)
        if not line:
            break
        size += len(line)
    return None, size, size - line.endswith(b"\n")


class _Spill:
    """An append-only local file holding lines of remote or compressed files (deleted with its creator)."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="docmix-shard-", suffix=".jsonl")
        self._f = os.fdopen(fd, "wb")
        self.size = 0
        weakref.finalize(self, os.unlink, self.path)

    def add(self, line: bytes) -> tuple[int, int]:
        start = self.size
        self._f.write(line)
        self.size += len(line)
        return start, self.size

    def close(self) -> None:
        self._f.close()


class JsonlReader:
    """The lines of one data shard of JSONL / JSONL.gz files (see the module docstring for the split).

    Index per document: (store, start, end, line) — a store is a local plain file read in place or the spill file of
    lines from remote / gzip files; `line` counts from where the shard's range starts in its file (the lines before
    it are counted only to name a bad record's line). A line longer than `max_line_bytes` is indexed as (store, -1,
    its length, line) and never read: `read` raises BadRecord for it."""

    def __init__(self, files: Sequence[storage.Path], shard: int = 0, shards: int = 1, max_line_bytes: int = 4 << 20):
        self.bytes_read = 0
        self.max_line_bytes = max_line_bytes
        self._stores: list[str] = []
        self._labels: list[str] = []
        self._line_base: list[int | tuple[str, int]] = []  # lines before a store's rows, or (file, byte) to count them
        self._spill: _Spill | None = None
        rows: list[tuple[int, int, int, int]] = []
        plain = [f for f in files if not f.name.endswith(".gz")]
        gz = [f for f in files if f.name.endswith(".gz")]
        sizes = [f.stat().length for f in plain]
        lo, hi = shard_range(sum(sizes), shard, shards)
        offset = 0
        for f, size in zip(plain, sizes):
            a, b = max(lo - offset, 0), min(hi - offset, size)
            offset += size
            if a < b:
                rows += self._read_plain(f, a, b)
        for k, f in enumerate(gz):
            if len(gz) >= shards and k % shards != shard:
                continue
            rows += self._read_gz(f, every=1 if len(gz) >= shards else shards, first=0 if len(gz) >= shards else shard)
        if self._spill is not None:
            self._spill.close()
        self._rows = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        self._maps: list[Any] | None = None

    def _store(self, path: str, label: str) -> int:
        self._stores.append(path)
        self._labels.append(label)
        self._line_base.append(0)
        return len(self._stores) - 1

    def _spill_store(self, label: str) -> tuple[_Spill, int]:
        if self._spill is None:
            self._spill = _Spill()
        return self._spill, self._store(self._spill.path, label)

    def _read_plain(self, f: storage.Path, a: int, b: int) -> list[tuple[int, int, int, int]]:
        """Lines whose first byte is in [a, b) of file f; their line numbers are counted from a (once)."""
        rows = []
        remote = storage.is_remote(f)
        if remote:
            spill, store = self._spill_store(os.fspath(f))
        else:
            store = self._store(os.fspath(f), os.fspath(f))
        with f.open("rb") as opened:
            # fsspec's files (gs://) read a line only whole: io's reader reads at most `size` bytes of one
            raw = opened if not remote else io.BufferedReader(opened, buffer_size=1 << 20)
            src = _CountingReader(raw)
            pos = a
            if a > 0:  # a line starting exactly at a follows a newline at a-1
                raw.seek(a - 1)
                pos = a - 1 + len(src.readline())
            self._line_base[store] = (os.fspath(f), pos) if pos > 0 else 0
            line_no = 0
            while pos < b:
                line, size, length = _next_line(src, self.max_line_bytes)
                if not size:
                    break
                line_no += 1
                if line is None:
                    rows.append((store, -1, length, line_no))
                elif line.strip():
                    if remote:
                        start, end = spill.add(line)
                    else:
                        start, end = pos, pos + len(line)
                    rows.append((store, start, end - (line.endswith(b"\n")), line_no))
                pos += size
        self.bytes_read += src.count
        return rows

    def _read_gz(self, f: storage.Path, every: int, first: int) -> list[tuple[int, int, int, int]]:
        """Lines first, first + every, ... of a gzip file, streamed through the decompressor into the spill file."""
        spill, store = self._spill_store(os.fspath(f))
        rows, k = [], -1
        with f.open("rb") as raw:
            src = _CountingReader(raw)
            try:
                with gzip.GzipFile(fileobj=src) as lines:
                    while True:
                        line, size, length = _next_line(lines, self.max_line_bytes)
                        if not size:
                            break
                        k += 1
                        if k % every != first:
                            continue
                        if line is None:
                            rows.append((store, -1, length, k + 1))
                        elif line.strip():
                            start, end = spill.add(line)
                            rows.append((store, start, end - (line.endswith(b"\n")), k + 1))
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, cut short (EOFError), or corrupt
                raise BadInputError(f"{os.fspath(f)}: unreadable gzip file after {k + 1} lines ({e}); a .gz corpus "
                                    "must be a complete gzip file") from None
        self.bytes_read += src.count
        return rows

    def _map(self, store: int):
        if self._maps is None:
            self._maps = [None] * len(self._stores)
        if self._maps[store] is None:
            with open(self._stores[store], "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._maps[store] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._maps[store]

    def __getstate__(self):
        return {**self.__dict__, "_maps": None, "_spill": None}  # mmaps do not pickle; workers reopen lazily

    def __len__(self) -> int:
        return len(self._rows)

    def where(self, i: int) -> str:
        store, _, _, line = (int(x) for x in self._rows[i])
        base = self._line_base[store]
        if isinstance(base, tuple):
            base = self._line_base[store] = _count_lines(storage.Path(base[0]), base[1])
        return f"{self._labels[store]}:{base + line}"

    def read(self, i: int) -> dict:
        store, start, end, _ = (int(x) for x in self._rows[i])
        if start < 0:
            raise BadRecord(too_large(end, self.max_line_bytes))
        return json_record(self._map(store)[start:end])


def _count_lines(f: storage.Path, end: int) -> int:
    """Newlines in bytes [0, end) of f (streamed)."""
    count, left = 0, end
    with f.open("rb") as src:
        while left > 0:
            chunk = src.read(min(left, 1 << 22))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count
