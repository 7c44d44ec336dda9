"""Pre-tokenization: a component's documents -> ArrayRecord shards of token ids, written by several processes.
The command line that reads a run's gin files for it is `python -m trainer.pretokenize`.

Each record is one document: int32 token ids [n] followed by uint8 target flags [n] (1 = a loss target), rendered with
the component's format, prefix and the mixture's tokenizer/BOS/EOS policy. `pretokenized.json` next to the shards
records the tokenizer (sha256 of tokenizer.json), counts and the rendering options. Read the shards back with
`Component(kind="pretokenized", paths=("DIR/*.array_record",), loss_weight=...)`: start-up fails if the mixture's
tokenizer is not the one the shards were written with.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import tempfile
from typing import Any

import numpy as np

import storage
from data.config import Component, MixtureConfig
from data.documents import DocumentEncoder
from data.readers import RangeSlice
from data.records import expand_paths, shard_range
from data.sources import DocumentSource, ScanReport, open_source
from data.tokenize import TextEncoder, tokenizer_sha256

METADATA = "pretokenized.json"


def encode_record(tokens: np.ndarray, weights: np.ndarray) -> bytes:
    return tokens.astype("<i4").tobytes() + (weights > 0).astype(np.uint8).tobytes()


def decode_record(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens int32 [n], target flags bool [n])."""
    if len(raw) % 5:
        raise ValueError(f"corrupt pretokenized record of {len(raw)} bytes (expected 5 bytes per token)")
    n = len(raw) // 5
    return np.frombuffer(raw, "<i4", count=n).astype(np.int32), np.frombuffer(raw, np.uint8, offset=4 * n) > 0


def _write_file(source: DocumentSource, encoder: DocumentEncoder, lo: int, hi: int, path: str) -> tuple[int, int]:
    from array_record.python import array_record_module

    local = path
    if storage.is_remote(path):  # the ArrayRecord writer writes local files: write here, then copy
        fd, local = tempfile.mkstemp(suffix=".array_record")
        os.close(fd)
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    tokens = 0
    for j in range(lo, hi):
        doc = encoder(source[j])
        writer.write(encode_record(doc["tokens"], doc["weights"]))
        tokens += len(doc["tokens"])
    writer.close()
    if local != path:
        storage.copy_file(local, path)
        os.unlink(local)
    return int(hi - lo), tokens


def pretokenize(config: MixtureConfig, component: str, output_dir: str, *, num_files: int = 8,
                processes: int = 2) -> dict[str, Any]:
    """Writes `num_files` ArrayRecord shards of the component's documents (in order) using `processes` processes;
    returns (and writes) the metadata."""
    comp = next((c for c in config.components if c.name == component), None)
    if comp is None:
        raise ValueError(f"no component {component!r} in the mixture; components are "
                         f"{[c.name for c in config.components]}")
    if comp.kind == "pretokenized":
        raise ValueError(f"component {component!r} is already pretokenized")
    doc_encoder = DocumentEncoder(comp, TextEncoder(config))
    source, report = open_source(comp, doc_encoder.check, max_bad_records=config.max_bad_records,
                                 max_document_bytes=config.max_document_bytes)
    out = storage.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_files = max(1, min(num_files, len(source)))
    bounds = np.linspace(0, len(source), num_files + 1).astype(int)
    paths = [str(out / f"{component}-{i:05d}-of-{num_files:05d}.array_record") for i in range(num_files)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, processes), mp_context=ctx) as pool:
        results = list(pool.map(_write_file, [source] * num_files, [doc_encoder] * num_files, bounds[:-1],
                                bounds[1:], paths))
    meta = {"component": component, "files": [storage.Path(p).name for p in paths],
            "file_documents": [r[0] for r in results], "documents": sum(r[0] for r in results),
            "tokens": sum(r[1] for r in results),
            "empty_filtered": report.empty, "bad_records": report.bad,
            "tokenizer_sha256": tokenizer_sha256(config.tokenizer), "vocab_size": doc_encoder.encoder.vocab_size,
            "format": comp.format, "prefix": comp.prefix, "add_bos": doc_encoder.encoder.add_bos,
            "add_eos": doc_encoder.encoder.add_eos}
    (out / METADATA).write_text(json.dumps(meta, indent=1))
    return meta


class PretokenizedDocuments:
    """Picklable map fn: a pretokenized record -> {"tokens", "weights", "doc_pos"} with the component's loss_weight."""

    def __init__(self, loss_weight: float):
        self.loss_weight = np.float32(loss_weight)

    def __call__(self, raw: bytes) -> dict[str, np.ndarray]:
        tokens, targets = decode_record(raw)
        return {"tokens": tokens, "weights": np.where(targets, self.loss_weight, np.float32(0)),
                "doc_pos": np.arange(len(tokens), dtype=np.int32)}


def open_pretokenized(component: Component, tokenizer: str, shard: int = 0, shards: int = 1):
    """(random-access raw records of data shard `shard` of `shards`, map fn, scan report from the metadata). Errors
    when the shards' tokenizer differs from the mixture's; the shards carry their own BOS/EOS/prefix rendering.

    The ArrayRecord reader opens local files only: shards on gs:// are copied to a local cache first, and only the
    files that hold this data shard's records (the metadata counts each file's documents)."""
    import grain

    files = expand_paths(component)
    report = ScanReport()
    tok_hash = tokenizer_sha256(tokenizer)
    counts: dict[str, int] = {}
    for folder in sorted({f.parent for f in files}):
        meta_file = folder / METADATA
        if not meta_file.exists():
            raise FileNotFoundError(f"component {component.name!r}: {meta_file} missing; write shards with "
                                    "python -m trainer.pretokenize")
        meta = json.loads(meta_file.read_text())
        stale = sorted(f.name for f in files if f.parent == folder and f.name not in meta["files"])
        if stale:  # e.g. shards of an earlier run with another --num_files: reading them would repeat documents
            raise ValueError(f"component {component.name!r}: {folder} holds shards not written by its last "
                             f"pretokenize run ({', '.join(stale[:3])}); remove them or point paths at the listed files")
        if meta["tokenizer_sha256"] != tok_hash:
            raise ValueError(f"component {component.name!r}: {folder} was pretokenized with another tokenizer "
                             f"(sha256 {meta['tokenizer_sha256'][:12]}…) than MixtureConfig.tokenizer={tokenizer}")
        report.empty += meta["empty_filtered"]
        report.bad += meta["bad_records"]
        for name, n in zip(meta["files"], meta.get("file_documents", ())):
            counts[str(folder / name)] = n
    if not any(storage.is_remote(f) for f in files):
        records = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        source = RangeSlice(records, *shard_range(len(records), shard, shards))
    else:
        source = _remote_shard(files, counts, shard, shards, report)
    report.documents = len(source)
    return source, PretokenizedDocuments(component.loss_weight), report


def _remote_shard(files: list[storage.Path], counts: dict[str, int], shard: int, shards: int,
                  report: ScanReport) -> RangeSlice:
    """Data shard `shard` of remote ArrayRecord files, from local copies of the files that hold its records (all
    files when the metadata predates per-file counts)."""
    import grain

    if all(str(f) in counts for f in files):
        starts = np.cumsum([0] + [counts[str(f)] for f in files])
        lo, hi = shard_range(int(starts[-1]), shard, shards)
        needed = [i for i in range(len(files)) if starts[i] < hi and starts[i + 1] > lo]
    else:
        starts, needed = None, list(range(len(files)))
    local = [storage.local_file(files[i]) for i in needed]
    report.bytes_read += sum(p.stat().st_size for p in local)
    records = grain.sources.ArrayRecordDataSource([str(p) for p in local]) if local else []
    if starts is None:
        return RangeSlice(records, *shard_range(len(records), shard, shards))
    offset = int(starts[needed[0]]) if needed else lo
    return RangeSlice(records, lo - offset, hi - offset)
