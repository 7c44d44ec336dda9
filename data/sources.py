"""Document sources: each data shard opens, reads and validates only its own records.

A component's records are split into `shards` data shards by position, never by content, so the split needs no
parse of anyone else's records (`shard_of`):
- plain JSONL files: contiguous byte ranges of the files' concatenation; a line belongs to the range holding its
  first byte (local files are read in place through an mmap, remote ones streamed once into a local spill file);
- JSONL.gz files: whole files round-robin when there are at least `shards` of them, else line k of each file goes to
  shard k % shards (every shard then streams the whole file through the decompressor, but parses only its lines);
- Parquet: contiguous row ranges, reading only the row groups that overlap them;
- ArrayRecord, TFDS, HF `save_to_disk`, seqio: contiguous index ranges of the random-access source.
Every reader is a `RecordReader` (`len`, `read(i) -> record dict`, `where(i) -> "file:line"`). `open_source` scans
the shard's records once: malformed ones (bad JSON, invalid UTF-8, missing field) are reported with their location
and skipped up to `max_bad_records` (per shard); empty or whitespace-only documents are filtered and counted. What
remains is a `DocumentSource`, a picklable random-access sequence that Grain shuffles and repeats. The scan report
counts what the shard parsed (`records_parsed`) and read (`bytes_read`), so a test can check that a host reads only
its own documents.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import mmap
import os
import tempfile
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import numpy as np

import storage
from data.config import Component

log = logging.getLogger(__name__)


class BadRecord(ValueError):
    """A record that cannot be used; the message says why."""


class BadInputError(ValueError):
    """More malformed records than the error budget allows, or a component with nothing usable."""


@dataclasses.dataclass
class ScanReport:
    documents: int = 0
    empty: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)
    records_parsed: int = 0  # records this process parsed and validated
    bytes_read: int = 0  # bytes this process read from the component's files (compressed size for .gz)

    def merge(self, other: "ScanReport") -> "ScanReport":
        return ScanReport(self.documents + other.documents, self.empty + other.empty, self.bad + other.bad,
                          self.records_parsed + other.records_parsed, self.bytes_read + other.bytes_read)


def shard_range(n: int, shard: int, shards: int) -> tuple[int, int]:
    """[lo, hi) of shard `shard` of `shards` contiguous parts of n items (sizes differ by at most one)."""
    return n * shard // shards, n * (shard + 1) // shards


def expand_paths(component: Component) -> list[storage.Path]:
    """Files named by the component's paths/globs, sorted; an error names any path that matches nothing."""
    files: list[storage.Path] = []
    for pattern in component.paths:
        path = storage.Path(pattern)
        try:
            if any(ch in pattern for ch in "*?["):  # wildcards in the file name only
                matches = sorted(path.parent.glob(path.name))
            else:
                matches = [path] if path.exists() else []
        except ImportError as e:  # a gs:// path without its filesystem client (gcsfs)
            raise ImportError(f"component {component.name!r}: path {pattern!r}: {e}") from None
        if not matches:
            raise FileNotFoundError(f"component {component.name!r}: path {pattern!r} does not exist")
        files.extend(matches)
    return list(dict.fromkeys(files))  # overlapping patterns must not read a file twice


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
        line = self._map(store)[start:end]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"invalid UTF-8 at byte {e.start}") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord(f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
        return record


def too_large(size: int, limit: int) -> str:
    return (f"a record of {size:,} bytes, over MixtureConfig.max_document_bytes={limit:,}; split the document into "
            "several records, or raise the limit")


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


class RangeSlice:
    """Records [lo, hi) of a random-access source (read on access)."""

    def __init__(self, records: Sequence[Any], lo: int, hi: int):
        self._records = records
        self.lo, self.hi = lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> Any:
        return self._records[self.lo + i]


class ListReader:
    """Records [lo, hi) of a random-access sequence (Parquet rows, ArrayRecord, HF datasets, TFDS, seqio examples),
    read on access; `where` is `label:index`."""

    bytes_read = 0  # random-access sources read lazily; nothing is read at start-up

    def __init__(self, records: Sequence[Any], label: str, convert: Callable[[Any], dict] = dict, *,
                 shard: int = 0, shards: int = 1, offset: int = 0):
        """`offset`: index of records[0] in the whole component (a Parquet shard holds only its own rows)."""
        self._records = RangeSlice(records, *shard_range(len(records), shard, shards))
        self._label = label
        self._convert = convert
        self._offset = offset

    def __len__(self) -> int:
        return len(self._records)

    def where(self, i: int) -> str:
        return f"{self._label}:{self._offset + self._records.lo + i}"

    def read(self, i: int) -> dict:
        return self._convert(self._records[i])


def _decode_bytes(record: dict) -> dict:
    """TFDS / ArrayRecord feature dicts hold bytes; decode them as strict UTF-8."""
    out = {}
    for k, v in record.items():
        if isinstance(v, (bytes, np.bytes_)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecord(f"field {k!r}: invalid UTF-8 at byte {e.start}") from None
        out[k] = v
    return out


def _json_record(raw: bytes) -> dict:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRecord(f"invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise BadRecord(f"malformed JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    return record


def parquet_reader(files: Sequence[storage.Path], shard: int, shards: int) -> ListReader:
    """Rows [lo, hi) of the files' concatenation, reading only the row groups that overlap them."""
    import pyarrow.parquet as pq

    metas = []
    for f in files:
        with f.open("rb") as src:
            metas.append(pq.ParquetFile(src).metadata)
    groups = [(i, g, m.row_group(g).num_rows, m.row_group(g).total_byte_size)
              for i, m in enumerate(metas) for g in range(m.num_row_groups)]
    lo, hi = shard_range(sum(n for _, _, n, _ in groups), shard, shards)
    rows: list[dict] = []
    first, start, read = None, 0, 0
    for i, g, n, size in groups:
        if start < hi and start + n > lo:
            with files[i].open("rb") as src:
                table = pq.ParquetFile(src).read_row_group(g)
            a, b = max(lo - start, 0), min(hi - start, n)
            rows += table.slice(a, b - a).to_pylist()
            first = start + a if first is None else first
            read += size
        start += n
    reader = ListReader(rows, ",".join(map(os.fspath, files)), offset=first or 0)
    reader.bytes_read = read
    return reader


def make_reader(component: Component, shard: int = 0, shards: int = 1, max_document_bytes: int = 4 << 20):
    """The RecordReader of data shard `shard` of `shards` for a component's kind (pretokenized components are read by
    data.pretokenize)."""
    kind = component.kind
    if kind == "jsonl":
        return JsonlReader(expand_paths(component), shard, shards, max_document_bytes)
    if kind == "array_record":
        import grain

        files = expand_paths(component)
        return ListReader(grain.sources.ArrayRecordDataSource([os.fspath(f) for f in files]),
                          "/".join(map(os.fspath, files)), _json_record, shard=shard, shards=shards)
    if kind == "parquet":
        return parquet_reader(expand_paths(component), shard, shards)
    if kind == "hf_disk":
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"component {component.name!r}: kind 'hf_disk' needs the `datasets` package "
                              "(pip install datasets)") from err

        folder = expand_paths(component)[0]
        ds = datasets.load_from_disk(os.fspath(folder))
        if isinstance(ds, datasets.DatasetDict):
            if component.split not in ds:
                raise ValueError(f"component {component.name!r}: split {component.split!r} not in {list(ds)}")
            ds = ds[component.split]
        return ListReader(ds, f"{folder}[{component.split}]", shard=shard, shards=shards)
    if kind == "tfds":
        import tensorflow_datasets as tfds

        ds = tfds.data_source(component.dataset, split=component.split, data_dir=component.data_dir)
        return ListReader(ds, f"tfds:{component.dataset}[{component.split}]", _decode_bytes, shard=shard, shards=shards)
    if kind == "seqio":
        from data.seqio_source import seqio_records

        return ListReader(seqio_records(component), f"seqio:{component.dataset}[{component.split}]", _decode_bytes,
                          shard=shard, shards=shards)
    raise ValueError(f"component {component.name!r}: no record reader for kind {kind!r}")


def _within(check: Callable[[dict], bool], component: Component, limit: int) -> Callable[[dict], bool]:
    """`check`, after a BadRecord for a text document over `limit` UTF-8 bytes."""
    def checked(record: dict) -> bool:
        text = record.get(component.text_field) if component.format == "text" else None
        if isinstance(text, str) and len(text) > limit // 4 and len(text.encode("utf-8")) > limit:
            raise BadRecord(too_large(len(text.encode("utf-8")), limit))
        return check(record)
    return checked


class DocumentSource:
    """The valid documents of a reader: `source[j]` is the record of the j-th valid document."""

    def __init__(self, reader, valid: np.ndarray):
        self._reader = reader
        self._valid = valid

    def __len__(self) -> int:
        return len(self._valid)

    def __getitem__(self, j: int) -> dict:
        return self._reader.read(int(self._valid[j]))


def open_source(component: Component, check: Callable[[dict], bool], *, max_bad_records: int, shard: int = 0,
                shards: int = 1, max_document_bytes: int = 4 << 20) -> tuple[DocumentSource, ScanReport]:
    """Opens data shard `shard` of `shards` and scans its records once. check(record) -> False for an empty document;
    raises BadRecord when unusable; so is a record over `max_document_bytes` (MixtureConfig.max_document_bytes).

    Raises BadInputError past `max_bad_records` bad records or when no document is left in the shard.
    """
    reader = make_reader(component, shard, shards, max_document_bytes)
    if not isinstance(reader, JsonlReader):  # JSONL lines are measured while they are indexed
        check = _within(check, component, max_document_bytes)
    report, valid = ScanReport(records_parsed=len(reader), bytes_read=reader.bytes_read), []
    where = f" in data shard {shard} of {shards}" if shards > 1 else ""
    for i in range(len(reader)):
        try:
            keep = check(reader.read(i))
        except BadRecord as e:
            report.bad.append(f"{reader.where(i)}: {e}")
            log.warning("component %r: skipping bad record %s", component.name, report.bad[-1])
            if len(report.bad) > max_bad_records:
                raise BadInputError(f"component {component.name!r}: {len(report.bad)} bad records{where} exceed "
                                    f"max_bad_records={max_bad_records}; first: {report.bad[:3]}") from None
            continue
        if keep:
            valid.append(i)
        else:
            report.empty += 1
    report.documents = len(valid)
    if report.empty:
        log.info("component %r: filtered %d empty documents%s", component.name, report.empty, where)
    if not valid:
        raise BadInputError(f"component {component.name!r} has no usable documents{where} ({len(reader)} records, "
                            f"{report.empty} empty, {len(report.bad)} bad)")
    return DocumentSource(reader, np.asarray(valid, dtype=np.int64)), report
