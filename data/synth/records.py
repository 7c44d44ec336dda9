"""JSONL records with provenance, shared by the renderer, the LLM generator, QA pairs and the filters.

A document record is one JSON object per line:
`{"id", "text", "spec", "spec_hash", "seed", "index", "axes": {institution, domain, document_type,
reasoning_approach}, "ai_identity", "generator", "created"}` (+ generator-specific keys such as `usage`).
`created` is an ISO-8601 UTC timestamp; pass a fixed one (CLI `--timestamp`, or SOURCE_DATE_EPOCH) for
byte-identical reruns. The data pipeline reads the `text` field.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
from typing import Any, Iterable, Iterator

import storage
from data.synth.assign import item_id
from data.synth.spec import Spec

TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def approx_tokens(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free proxy for BPE token counts (within ~20% for English)."""
    return len(TOKEN_RE.findall(text))


def timestamp(fixed: str | None = None) -> str:
    """`fixed` if given, else SOURCE_DATE_EPOCH if set, else now (UTC, ISO-8601, seconds)."""
    if fixed:
        return fixed
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
              else datetime.datetime.now(datetime.timezone.utc))
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def make_record(spec: Spec, seed: int, index: int, axes: dict[str, str], *, generator: str, created: str,
                kind: str = "doc", **fields: Any) -> dict[str, Any]:
    """A record with full provenance plus `fields` (`text=` for documents, `messages=` etc. for QA pairs);
    `id` is deterministic in (spec content, seed, kind, index)."""
    return {"id": item_id(spec, seed, index, kind), **fields, "spec": spec.name, "spec_hash": spec.hash,
            "seed": seed, "index": index, "axes": dict(axes), "ai_identity": spec.ai_identity,
            "generator": generator, "created": created}


def record_text(record: dict[str, Any]) -> str:
    """The trainable text of any record: `text`, the `messages` contents, or instruction/input/output."""
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("messages"), list):
        return "\n\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    parts = [record.get(k) for k in ("instruction", "input", "output")]
    if any(isinstance(p, str) for p in parts):
        return "\n\n".join(p for p in parts if isinstance(p, str) and p)
    raise ValueError(f"record {record.get('id', '?')} has no text, messages or instruction/output fields")


def write_jsonl(path: str | pathlib.Path, records: Iterable[dict[str, Any]]) -> int:
    """Writes records atomically (storage.atomic_write; local or gs://); returns how many were written."""
    path = storage.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with storage.atomic_write(path, encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | pathlib.Path, *, require: tuple[str, ...] = ("text",)) -> Iterator[dict[str, Any]]:
    """Yields records (local or gs://); a malformed line or a record missing a required key raises naming file:line."""
    path = storage.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid UTF-8 at byte {err.start}") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in require if k not in record]
            if missing:
                raise ValueError(f"{path}:{lineno}: record lacks {missing}")
            yield record
