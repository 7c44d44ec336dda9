"""Helpers for the data tests (no tests here): a word-level tokenizer with exact token counts, JSONL writers, and the
short/long corpus of the pipeline tests with its mixtures."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tokenizers

from data.config import Component, MixtureConfig

SPECIALS = ["<unk>", "<s>", "</s>", "<DOCTAG>"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def word_tokenizer(folder: pathlib.Path, n_words: int = 5000, **config) -> pathlib.Path:
    """A WordLevel tokenizer over SPECIALS + a..z + w0..w{n-1}, whitespace-split, so a text of k words is k tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS + LETTERS + [f"w{i}" for i in range(n_words)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS[:3])
    tok.decoder = tokenizers.decoders.WordPiece()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def write_jsonl(path: pathlib.Path, records, *, raw_lines: dict[int, bytes] | None = None) -> pathlib.Path:
    """Writes one JSON object per line; raw_lines puts given bytes at given line indices (for bad-input tests)."""
    lines = [json.dumps(r).encode() for r in records]
    for i, raw in sorted((raw_lines or {}).items()):
        lines.insert(i, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def words_doc(n: int, tag: int) -> dict:
    """A document of exactly n words (n tokens with the word tokenizer), distinct per tag."""
    return {"text": " ".join(f"w{(tag * 7 + j) % 5000}" for j in range(n))}


def write_gin(path: pathlib.Path, *, tokenizer: pathlib.Path, components: dict[str, pathlib.Path],
              weights: dict[str, float], model_dir: pathlib.Path, seq_len: int = 16, batch_size: int = 4,
              block_size: int = 8) -> pathlib.Path:
    """A small run config (base + tiny model) whose mixture has one JSONL component per entry of `components`."""
    names = ", ".join(f"@{n}/Component()" for n in components)
    lines = ["include 'base.gin'", "include 'models/tiny.gin'", f"MODEL_DIR = '{model_dir}'", f"SEQ_LEN = {seq_len}",
             f"BATCH_SIZE = {batch_size}", f"MIXTURE_WEIGHTS = {weights!r}", f"MixtureConfig.components = ({names},)",
             f"MixtureConfig.tokenizer = '{tokenizer}'", f"MixtureConfig.block_size = {block_size}"]
    for name, file in components.items():
        lines += [f"{name}/Component.name = '{name}'", f"{name}/Component.paths = ('{file}',)"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("corpus")
    return {
        "tok": word_tokenizer(d / "tok"),
        # 28 words + BOS + EOS = 30 tokens; 2,998 words + 2 = 3,000 tokens.
        "short": write_jsonl(d / "short.jsonl", [words_doc(28, i) for i in range(300)]),
        "long": write_jsonl(d / "long.jsonl", [words_doc(2998, i) for i in range(12)]),
        "tiny": write_jsonl(d / "tiny.jsonl", [{"text": "a b c"}, {"text": "d e"}]),
    }


def mixture(corpus, weights, **kw) -> MixtureConfig:
    comps = kw.pop("components", None) or (Component("short", paths=(str(corpus["short"]),)),
                                           Component("long", paths=(str(corpus["long"]),)))
    return MixtureConfig(components=comps, weights=weights, tokenizer=str(corpus["tok"]), **kw)


def take(pipeline, n: int) -> list[dict]:
    return [next(pipeline.iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
