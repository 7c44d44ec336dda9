"""The demo's data as gin-callable paths: data.demo's training assets plus held-out sets built from the same sources.

Held out means never in the training files: KJV chapters after the ones data.demo uses for replay, and welfare /
control documents rendered with a seed the training set does not use.
"""
from __future__ import annotations

import json
import os
import pathlib

import filelock

from data import demo
from data.synth.records import write_jsonl
from data.synth.render import render_records
from data.synth.spec import load_spec

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HELDOUT = {"heldout_chapters": (1000, 1040), "heldout_docs": 40, "heldout_seed": 1_000_003}
TRAINING_KINDS = {"replay": "replay_jsonl", "welfare": "welfare_jsonl", "control": "control_jsonl",
                  "tokenizer": "tokenizer_dir"}
HELDOUT_KINDS = ("replay_heldout", "welfare_heldout", "control_heldout")


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DOCMIX_CACHE", REPO_ROOT / "cache"))


def demo_asset(kind: str, cache: str | None = None) -> str:
    """Path of one demo asset: `replay`, `welfare`, `control` (JSONL), `tokenizer` (folder), or a held-out JSONL
    (`replay_heldout`, `welfare_heldout`, `control_heldout`). Built on first use, offline and deterministic."""
    assets = demo.prepare(cache or cache_dir())
    if kind in TRAINING_KINDS:
        return str(getattr(assets, TRAINING_KINDS[kind]))
    if kind not in HELDOUT_KINDS:
        raise ValueError(f"demo_asset.kind must be one of {sorted(TRAINING_KINDS) + list(HELDOUT_KINDS)}, "
                         f"got {kind!r}")
    folder = assets.tokenizer_dir.parent.with_name(assets.tokenizer_dir.parent.name + "-heldout")
    _build_heldout(folder)
    return str(folder / f"{kind}.jsonl")


def _build_heldout(folder: pathlib.Path) -> None:
    done = folder / "DONE"
    if done.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(folder) + ".lock"):
        if done.exists():
            return
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
        done.write_text(json.dumps(HELDOUT) + "\n")
