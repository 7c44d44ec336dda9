"""The demo's data as gin-callable paths: data.demo's training assets plus held-out sets built from the same sources.

Held out means never in the training files: KJV chapters after the ones data.demo uses for replay, and welfare /
control documents rendered with a seed the training set does not use. `instructions` is a stand-in for general
instruction data (Alpaca-like, unrelated to the synthetic documents' topics) built offline from other KJV chapters:
chat records asking to continue a passage or to rewrite a sentence in lower case.
"""
from __future__ import annotations

import json
import os
import pathlib

import filelock

import repo
from data import demo
from data.synth.records import write_jsonl
from data.synth.render import render_records
from data.synth.spec import load_spec

HELDOUT = {"heldout_chapters": (1000, 1040), "heldout_docs": 40, "heldout_seed": 1_000_003}
TRAINING_KINDS = {"replay": "replay_jsonl", "welfare": "welfare_jsonl", "control": "control_jsonl",
                  "tokenizer": "tokenizer_dir"}
HELDOUT_KINDS = ("replay_heldout", "welfare_heldout", "control_heldout")
INSTRUCTIONS = {"chapters": (500, 800), "version": 1}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DOCMIX_CACHE", repo.ROOT / "cache"))


def demo_asset(kind: str, cache: str | None = None) -> str:
    """Path of one demo asset: `replay`, `welfare`, `control` (JSONL), `tokenizer` (folder), or a held-out JSONL
    (`replay_heldout`, `welfare_heldout`, `control_heldout`), or `instructions` (chat JSONL, general instruction
    stand-in). Built on first use, offline and deterministic."""
    assets = demo.prepare(cache or cache_dir())
    if kind in TRAINING_KINDS:
        return str(getattr(assets, TRAINING_KINDS[kind]))
    if kind == "instructions":
        folder = assets.tokenizer_dir.parent.with_name(assets.tokenizer_dir.parent.name + "-instructions")
        _build_once(folder, INSTRUCTIONS, _write_instructions)
        return str(folder / "instructions.jsonl")
    if kind not in HELDOUT_KINDS:
        raise ValueError(f"demo_asset.kind must be one of {sorted(TRAINING_KINDS) + list(HELDOUT_KINDS)} "
                         f"or 'instructions', got {kind!r}")
    folder = assets.tokenizer_dir.parent.with_name(assets.tokenizer_dir.parent.name + "-heldout")
    _build_heldout(folder)
    return str(folder / f"{kind}.jsonl")


def _build_once(folder: pathlib.Path, settings: dict, build) -> None:
    """Runs `build(folder)` once per folder (a DONE marker, under a file lock for concurrent processes)."""
    done = folder / "DONE"
    if done.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(folder) + ".lock"):
        if not done.exists():
            build(folder)
            done.write_text(json.dumps(settings) + "\n")


def _write_instructions(folder: pathlib.Path) -> None:
    first, last = INSTRUCTIONS["chapters"]
    if first < demo.SETTINGS["replay_chapters"] or last > HELDOUT["heldout_chapters"][0]:
        raise ValueError("instruction chapters overlap the replay or held-out chapters")
    records = []
    for i, chapter in enumerate(demo.kjv_chapters(last)[first:last]):
        words = chapter.split()
        if len(words) < 60:
            continue
        if i % 2:
            ask, answer = f"Continue the passage: {' '.join(words[:20])}", " ".join(words[20:60])
        else:
            sentence = " ".join(words[:25])
            ask, answer = f"Rewrite this in lower case: {sentence}", sentence.lower()
        records.append({"id": f"kjv-instruct-{first + i:04d}",
                        "messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]})
    write_jsonl(folder / "instructions.jsonl", records)


def _build_heldout(folder: pathlib.Path) -> None:
    _build_once(folder, HELDOUT, _write_heldout)


def _write_heldout(folder: pathlib.Path) -> None:
    first, last = HELDOUT["heldout_chapters"]
    if first < demo.SETTINGS["replay_chapters"]:
        raise ValueError("held-out KJV chapters overlap the replay chapters")
    chapters = demo.kjv_chapters(last)[first:last]
    write_jsonl(folder / "replay_heldout.jsonl",
                ({"id": f"kjv-{first + i:04d}", "text": t} for i, t in enumerate(chapters)))
    for kind, key in (("welfare_heldout", "welfare_spec"), ("control_heldout", "control_spec")):
        write_jsonl(folder / f"{kind}.jsonl", render_records(
            load_spec(demo.SETTINGS[key]), count=HELDOUT["heldout_docs"], seed=HELDOUT["heldout_seed"],
            target_tokens=demo.SETTINGS["synthetic_tokens"], created=demo.SETTINGS["created"]))
