"""Document sources: each data shard opens, reads and validates only its own records.

A component's records are split into `shards` data shards by position, never by content, so the split needs no
parse of anyone else's records: contiguous byte ranges of JSONL files, lines or whole files of JSONL.gz
(data/jsonl_reader.py), contiguous row or index ranges of the random-access kinds (data/readers.py). `open_source`
scans the shard's records once: malformed ones (bad JSON, invalid UTF-8, missing field) are reported with their
location and skipped up to `max_bad_records` (per shard); empty or whitespace-only documents are filtered and
counted. What remains is a `DocumentSource`, a picklable random-access sequence that Grain shuffles and repeats. The
scan report counts what the shard parsed (`records_parsed`) and read (`bytes_read`), so a test can check that a host
reads only its own documents.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from data.config import Component
from data.jsonl_reader import JsonlReader
from data.readers import make_reader
from data.records import BadInputError, BadRecord, too_large

log = logging.getLogger(__name__)


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
