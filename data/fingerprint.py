"""The identity of a mixture's training data: a fingerprint of each active component's files, which every checkpoint
records (trainer.run_metadata) and a resume compares, so that a run never continues its data position on other
documents without saying so.

A file-based component (jsonl, parquet, array_record, pretokenized; hf_disk: every file under its folder) is the list
of its files in the order the pipeline reads them, each with its size and the SHA-256 of the part read for the
fingerprint: its first and last EDGE bytes (the whole file when it is at most 2 x EDGE). A tfds or seqio component
is its dataset name, split and data_dir (their files belong to those libraries). Files are named relative to the
component's common folder, so a corpus moved elsewhere (another folder, local <-> gs://) with the same names, sizes
and contents is the same data.

Guarantee: a file added, removed, renamed or reordered, any change of a file's size, and any change within the first
or last EDGE bytes of a file (so every byte of a file up to 2 x EDGE) is found. An edit inside a larger file that
keeps its size and leaves both ends alone is not. Cost: the listings the pipeline makes anyway, plus two ranged reads
of at most EDGE bytes per file (READERS at a time): 2,000 reads for a corpus of 1,000 files, whatever their size.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import posixpath
from typing import Any

import storage
from data.config import Component, MixtureConfig
from data.records import expand_paths

EDGE = 1 << 20
READERS = 16


def _files(component: Component) -> list[storage.Path]:
    """The files of a component in the order its reader reads them (hf_disk: every file under the folder, sorted)."""
    files = expand_paths(component)
    if component.kind != "hf_disk":
        return files
    fs, root = storage.filesystem(files[0])
    return [storage.Path(fs.unstrip_protocol(name)) for name in sorted(fs.find(root))]


def _file(path: storage.Path) -> tuple[int, str]:
    """(size, SHA-256 hex of the size, the first EDGE bytes and the last EDGE bytes) of one file."""
    fs, name = storage.filesystem(path)
    size = int(fs.size(name))
    digest = hashlib.sha256(str(size).encode())
    if size <= 2 * EDGE:
        digest.update(fs.cat_file(name))
    else:
        digest.update(fs.cat_file(name, 0, EDGE))
        digest.update(fs.cat_file(name, size - EDGE, size))
    return size, digest.hexdigest()


def fingerprint(mixture: MixtureConfig) -> dict[str, dict[str, Any]]:
    """{component: {"kind", "files": [{"path", "size", "sha256"}, ...]} or {"kind", "dataset", "split", "data_dir"}}
    for every active component (inactive ones are never read), JSON-able."""
    out: dict[str, dict[str, Any]] = {}
    listed: dict[str, list[storage.Path]] = {}
    for c in mixture.active_components:
        if c.kind in ("tfds", "seqio"):
            out[c.name] = {"kind": c.kind, "dataset": c.dataset, "split": c.split, "data_dir": c.data_dir}
        else:
            listed[c.name] = _files(c)
    every = [f for files in listed.values() for f in files]
    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        read = dict(zip(map(os.fspath, every), pool.map(_file, every)))
    for c in mixture.active_components:
        if c.name in listed:
            out[c.name] = {"kind": c.kind, "files": [{"path": os.fspath(f), "size": read[os.fspath(f)][0],
                                                      "sha256": read[os.fspath(f)][1]} for f in listed[c.name]]}
    return out


def _keyed(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> tuple[list[tuple], list[tuple]]:
    """(name, size, sha256) of each file of two fingerprints, in order: named by path when the two share a file's
    path, else (a corpus moved elsewhere) by the path relative to each one's common folder."""
    def relative(files: list[dict[str, Any]]) -> list[str]:
        paths = [f["path"].split("://", 1)[-1] for f in files]
        folder = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
        return [posixpath.relpath(p, folder) if folder else p for p in paths]

    shared = {f["path"] for f in old} & {f["path"] for f in new}
    names = (lambda files: [f["path"] for f in files]) if shared else relative
    return ([(n, f["size"], f["sha256"]) for n, f in zip(names(old), old)],
            [(n, f["size"], f["sha256"]) for n, f in zip(names(new), new)])


def changes(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]], limit: int = 5) -> list[str]:
    """What differs between two fingerprints, one entry per changed component present in both ("component 'replay':
    /data/part-1.jsonl resized (100 -> 120 bytes), /data/part-2.jsonl added"); at most `limit` files named per
    component. Components in only one of them are the mixture's business (data.mixture), not a change of data."""
    out = []
    for name in [n for n in current if n in saved]:
        old, new = saved[name], current[name]
        if "files" not in old or "files" not in new:
            if old != new:
                out.append(f"component {name!r}: {_source(old)} -> {_source(new)}")
            continue
        a, b = _keyed(old["files"], new["files"])
        if a == b:
            continue
        was, now = {n: (size, sha) for n, size, sha in a}, {n: (size, sha) for n, size, sha in b}
        found = [f"{n} removed" for n in was if n not in now] + [f"{n} added" for n in now if n not in was]
        for n in (n for n in now if n in was and now[n] != was[n]):
            found.append(f"{n} resized ({was[n][0]} -> {now[n][0]} bytes)" if now[n][0] != was[n][0]
                         else f"{n} content changed")
        found = found or ["the order of its files changed"]
        more = f" and {len(found) - limit} more" if len(found) > limit else ""
        out.append(f"component {name!r}: {', '.join(found[:limit])}{more}")
    return out


def _source(record: dict[str, Any]) -> str:
    if "files" in record:
        return f"{len(record['files'])} {record['kind']} file(s)"
    return f"{record['kind']} {record['dataset']}[{record['split']}]" + (
        f" in {record['data_dir']}" if record.get("data_dir") else "")
