"""Document sources: random-access records validated once at start-up.

Every source kind is a `RecordReader` (`len`, `read(i) -> record dict`, `where(i) -> "file:line"`). `open_source`
scans all records once: malformed ones (bad JSON, invalid UTF-8, missing field) are reported with their location and
skipped up to `max_bad_records`; empty or whitespace-only documents are filtered and counted. What remains is a
`DocumentSource`, a picklable random-access sequence that Grain shuffles, repeats and shards.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import mmap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

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


def expand_paths(component: Component) -> list[epath.Path]:
    """Files named by the component's paths/globs, sorted; an error names any path that matches nothing."""
    files: list[epath.Path] = []
    for pattern in component.paths:
        path = epath.Path(pattern)
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


class JsonlReader:
    """Lines of JSONL / JSONL.gz files; .gz files are decompressed into memory, plain local files are mmapped."""

    def __init__(self, files: Sequence[epath.Path]):
        self._files = [str(f) for f in files]
        self._data: list[Any] | None = None
        spans = []
        for i in range(len(self._files)):
            data = self._load(i)
            starts, ends = _line_spans(data)
            spans.append(np.stack([np.full(len(starts), i), starts, ends], axis=1))
        self._spans = np.concatenate(spans) if spans else np.zeros((0, 3), np.int64)

    def _load(self, i: int):
        if self._data is None:
            self._data = [None] * len(self._files)
        if self._data[i] is None:
            path = epath.Path(self._files[i])
            if path.name.endswith(".gz"):
                self._data[i] = gzip.decompress(path.read_bytes())
            elif path.stat().length == 0:
                self._data[i] = b""
            else:
                try:
                    with open(self._files[i], "rb") as f:
                        self._data[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):  # not a local file (gs://...): read it whole
                    self._data[i] = path.read_bytes()
        return self._data[i]

    def __getstate__(self):
        return {**self.__dict__, "_data": None}  # mmaps do not pickle; workers reopen lazily

    def __len__(self) -> int:
        return len(self._spans)

    def where(self, i: int) -> str:
        f, start, _ = self._spans[i]
        data = self._load(int(f))
        line = bytes(data[:start]).count(b"\n") + 1
        return f"{self._files[f]}:{line}"

    def read(self, i: int) -> dict:
        f, start, end = (int(x) for x in self._spans[i])
        line = self._load(f)[start:end]
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


def _line_spans(data) -> tuple[np.ndarray, np.ndarray]:
    """Start/end byte offsets of the non-blank lines of `data`."""
    buf = np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(0, np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(buf)]])
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    blank = np.array([not bytes(data[s:e]).strip() for s, e in zip(starts, ends)], dtype=bool) if len(starts) else \
        np.zeros(0, bool)
    return starts[~blank].astype(np.int64), ends[~blank].astype(np.int64)


class ListReader:
    """Records already in memory (Parquet rows, HF datasets rows, seqio examples); `where` is `label:index`."""

    def __init__(self, records: Sequence[Any], label: str, convert: Callable[[Any], dict] = dict):
        self._records = records
        self._label = label
        self._convert = convert

    def __len__(self) -> int:
        return len(self._records)

    def where(self, i: int) -> str:
        return f"{self._label}:{i}"

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


class ArrayRecordReader(ListReader):
    """ArrayRecord files whose records are UTF-8 JSON objects (one document each)."""

    def __init__(self, files: Sequence[epath.Path]):
        import grain

        super().__init__(grain.sources.ArrayRecordDataSource([str(f) for f in files]), "/".join(map(str, files)))

    def read(self, i: int) -> dict:
        raw = self._records[i]
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRecord(f"invalid UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise BadRecord(f"malformed JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
        return record


def make_reader(component: Component):
    """The RecordReader for a component's kind (pretokenized components are read by data.pretokenize)."""
    kind = component.kind
    if kind == "jsonl":
        return JsonlReader(expand_paths(component))
    if kind == "array_record":
        return ArrayRecordReader(expand_paths(component))
    if kind == "parquet":
        import pyarrow.parquet as pq

        files = expand_paths(component)
        rows = [r for f in files for r in pq.read_table(str(f)).to_pylist()]
        return ListReader(rows, ",".join(map(str, files)))
    if kind == "hf_disk":
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"component {component.name!r}: kind 'hf_disk' needs the `datasets` package "
                              "(pip install datasets)") from err

        folder = expand_paths(component)[0]
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if component.split not in ds:
                raise ValueError(f"component {component.name!r}: split {component.split!r} not in {list(ds)}")
            ds = ds[component.split]
        return ListReader(ds, f"{folder}[{component.split}]")
    if kind == "tfds":
        import tensorflow_datasets as tfds

        ds = tfds.data_source(component.dataset, split=component.split, data_dir=component.data_dir)
        return ListReader(ds, f"tfds:{component.dataset}[{component.split}]", _decode_bytes)
    if kind == "seqio":
        from data.seqio_source import seqio_records

        return ListReader(seqio_records(component), f"seqio:{component.dataset}[{component.split}]", _decode_bytes)
    raise ValueError(f"component {component.name!r}: no record reader for kind {kind!r}")


class DocumentSource:
    """The valid documents of a reader: `source[j]` is the record of the j-th valid document."""

    def __init__(self, reader, valid: np.ndarray):
        self._reader = reader
        self._valid = valid

    def __len__(self) -> int:
        return len(self._valid)

    def __getitem__(self, j: int) -> dict:
        return self._reader.read(int(self._valid[j]))


def open_source(component: Component, check: Callable[[dict], bool], *, max_bad_records: int
                ) -> tuple[DocumentSource, ScanReport]:
    """Scans every record once. check(record) -> False for an empty document; raises BadRecord when unusable.

    Raises BadInputError past `max_bad_records` bad records or when no document is left.
    """
    reader = make_reader(component)
    report, valid = ScanReport(), []
    for i in range(len(reader)):
        try:
            keep = check(reader.read(i))
        except BadRecord as e:
            report.bad.append(f"{reader.where(i)}: {e}")
            log.warning("component %r: skipping bad record %s", component.name, report.bad[-1])
            if len(report.bad) > max_bad_records:
                raise BadInputError(f"component {component.name!r}: {len(report.bad)} bad records exceed "
                                    f"max_bad_records={max_bad_records}; first: {report.bad[:3]}") from None
            continue
        if keep:
            valid.append(i)
        else:
            report.empty += 1
    report.documents = len(valid)
    if report.empty:
        log.info("component %r: filtered %d empty documents", component.name, report.empty)
    if not valid:
        raise BadInputError(f"component {component.name!r} has no usable documents ({len(reader)} records, "
                            f"{report.empty} empty, {len(report.bad)} bad)")
    return DocumentSource(reader, np.asarray(valid, dtype=np.int64)), report
