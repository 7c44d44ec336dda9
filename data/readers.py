"""The record readers of each component kind: JSONL (data.jsonl_reader), and the random-access kinds (Parquet,
ArrayRecord, HF `save_to_disk`, TFDS, seqio), whose data shards are contiguous index ranges (Parquet: row ranges,
reading only the row groups that overlap them).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import storage
from data.config import Component
from data.jsonl_reader import JsonlReader
from data.records import BadRecord, expand_paths, json_record, shard_range


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
                          "/".join(map(os.fspath, files)), json_record, shard=shard, shards=shards)
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
