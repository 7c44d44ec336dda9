"""Corpora named in an experiment file, turned into JSONL files the data pipeline reads.

A corpus is one of
- a path to a JSONL file (`"corpora/welfare.clean.jsonl"`), used as it is;
- `"demo:KIND"`, a demo asset (`trainer.demo_assets.demo_asset`: welfare, control, instructions, ...);
- `{render = SPEC, count = N, seed = S, target_tokens = T}`: documents from the offline renderer (`data.synth render`);
- `{qa = SPEC, count = N, seed = S, format = "chat"}`: question-answer pairs of a spec (`data.synth qa`).
Rendered corpora are written under the experiment's folder once and reused.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import storage
from data.config import Component, MixtureConfig
from data.documents import DocumentEncoder
from data.synth.records import read_jsonl, write_jsonl
from data.tokenize import TextEncoder
from experiments.settings import SettingsError

CREATED = "2026-01-01T00:00:00Z"  # fixed provenance stamp: rendered corpora are byte-identical across reruns


def resolve(spec: str | Mapping[str, Any], folder: storage.Path, where: str) -> storage.Path:
    """The JSONL file of one corpus entry (rendering it into `folder` first when it is a render/qa table); local or
    gs://."""
    if isinstance(spec, str):
        if spec.startswith("demo:"):
            from trainer.demo_assets import demo_asset

            return storage.Path(demo_asset(spec[len("demo:"):]))
        path = storage.absolute(spec)
        if not path.is_file():
            raise SettingsError(f"{where}: corpus file {path} does not exist")
        return path
    if not isinstance(spec, Mapping) or len({"render", "qa"} & set(spec)) != 1:
        raise SettingsError(f"{where}: a corpus is a path, 'demo:KIND', or a table with `render` or `qa`, got {spec!r}")
    known = {"render", "qa", "count", "seed", "target_tokens", "format", "ai_identity"}
    if set(spec) - known:
        raise SettingsError(f"{where}: unknown corpus key(s) {sorted(set(spec) - known)}")
    key = hashlib.sha256(json.dumps(dict(spec), sort_keys=True).encode()).hexdigest()[:10]
    out = folder / f"{spec.get('render') or spec.get('qa')}-{key}.jsonl"
    if not out.is_file():
        write_jsonl(out, _records(spec))
    return storage.absolute(out)


def _records(spec: Mapping[str, Any]):
    from data.synth.spec import load_spec

    name = spec.get("render") or spec["qa"]
    loaded = load_spec(name)
    if "ai_identity" in spec:
        loaded = loaded.with_overrides(ai_identity=spec["ai_identity"])
    if "render" in spec:
        from data.synth.render import render_records

        return render_records(loaded, count=spec.get("count"), seed=spec.get("seed"),
                              target_tokens=spec.get("target_tokens"), created=CREATED)
    from data.synth.qa import qa_records

    return qa_records(loaded, count=spec.get("count"), seed=spec.get("seed"), fmt=spec.get("format", "chat"),
                      created=CREATED)


def first_documents(path: storage.Path, count: int | None, folder: storage.Path, name: str) -> storage.Path:
    """A file with the first `count` records of `path` (None: `path` itself). Fewer records than asked is an error."""
    if count is None:
        return path
    out = folder / f"{name}-first{count}.jsonl"
    if out.is_file():
        return storage.absolute(out)
    records = []
    for record in read_jsonl(path, require=()):
        records.append(record)
        if len(records) == count:
            break
    if len(records) < count:
        raise SettingsError(f"corpus {name!r} ({path}) has {len(records)} records, fewer than the {count} asked for")
    write_jsonl(out, records)
    return storage.absolute(out)


def count_tokens(path: storage.Path, component: Component, mixture: MixtureConfig) -> tuple[int, int]:
    """(documents, tokens) of a corpus as the training pipeline tokenizes it for `component` (its format, prefix,
    BOS/EOS policy); empty documents are left out, as the pipeline does."""
    encoder = DocumentEncoder(component, TextEncoder(mixture))
    documents = tokens = 0
    for record in read_jsonl(path, require=()):
        if encoder.check(record):
            documents += 1
            tokens += len(encoder(record)["tokens"])
    if not documents:
        raise SettingsError(f"corpus {path} has no non-empty documents")
    return documents, tokens
