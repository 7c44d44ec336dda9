"""What every record reader shares: the errors of a bad record or input, a component's files, and the split of n
records into contiguous data shards.

A reader (`data.jsonl_reader.JsonlReader`, `data.readers.ListReader`) holds the records of one data shard: `len`,
`read(i) -> record dict` (raises BadRecord for one that cannot be used), `where(i) -> "file:line"` (a bad record's
location) and `bytes_read` (what opening the shard read).
"""
from __future__ import annotations

import json

import storage
from data.config import Component


class BadRecord(ValueError):
    """A record that cannot be used; the message says why."""


class BadInputError(ValueError):
    """More malformed records than the error budget allows, or a component with nothing usable."""


def json_record(raw: bytes) -> dict:
    """The JSON object in one record's UTF-8 bytes; BadRecord saying what is wrong (UTF-8, JSON, not an object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"invalid UTF-8 at byte {e.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    return record


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


def too_large(size: int, limit: int) -> str:
    return (f"a record of {size:,} bytes, over MixtureConfig.max_document_bytes={limit:,}; split the document into "
            "several records, or raise the limit")
