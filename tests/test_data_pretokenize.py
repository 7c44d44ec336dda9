"""Pre-tokenized ArrayRecord shards (written by 2 processes) give exactly the batches of the raw JSONL component."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data.config import Component, MixtureConfig
from data.pipeline import build
from data.pretokenize import pretokenize
from data.records import expand_paths
from tests.test_data_util import word_tokenizer, words_doc, write_gin, write_jsonl


def test_pretokenized_shards_equal_raw_pipeline(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "c.jsonl", [words_doc(3 + i % 11, i) for i in range(60)] + [{"text": " "}])
    raw = Component("c", paths=(str(path),), prefix="<DOCTAG> ", loss_weight=0.5)
    cfg = MixtureConfig(components=(raw,), weights={"c": 1.0}, tokenizer=str(tok), seq_len=16, batch_size=4,
                        block_size=8)
    meta = pretokenize(cfg, "c", str(tmp_path / "out"), num_files=3, processes=2)
    assert meta["documents"] == 60 and meta["empty_filtered"] == 1 and len(meta["files"]) == 3
    assert json.loads((tmp_path / "out" / "pretokenized.json").read_text())["tokens"] == meta["tokens"]
    pre = Component("c", kind="pretokenized", paths=(str(tmp_path / "out" / "*.array_record"),), loss_weight=0.5)
    a, b = build(cfg), build(MixtureConfig(components=(pre,), weights={"c": 1.0}, tokenizer=str(tok), seq_len=16,
                                           batch_size=4, block_size=8))
    for _ in range(12):  # past one epoch (60 docs ~ 600 tokens ~ 10 batches)
        x, y = next(a.iterator), next(b.iterator)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    startup = ("records_parsed", "bytes_read")  # start-up work differs by design: raw JSONL is parsed, shards not
    sa, sb = ({n: {k: v for k, v in c.items() if k not in startup} for n, c in p.stats()["components"].items()}
              for p in (a, b))
    assert sa == sb and a.stats()["rows"] == b.stats()["rows"]

    other = word_tokenizer(tmp_path / "tok2", n_words=10)
    with pytest.raises(ValueError, match="pretokenized with another tokenizer"):
        build(MixtureConfig(components=(pre,), weights={"c": 1.0}, tokenizer=str(other), seq_len=16, batch_size=4))


def test_pretokenize_cli(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "c.jsonl", [words_doc(4, i) for i in range(10)])
    gin_file = write_gin(tmp_path / "run.gin", tokenizer=tok, components={"c": path}, weights={"c": 1.0},
                         model_dir=tmp_path / "run")
    res = subprocess.run([sys.executable, "-m", "trainer.pretokenize", f"--gin_file={gin_file}", "--component", "c",
                          "--output_dir", str(tmp_path / "out"), "--num_files", "2", "--processes", "1"],
                         cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout.strip().splitlines()[-1])
    assert (meta["documents"], meta["tokens"], len(meta["files"])) == (10, 60, 2)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.array_record")) == meta["files"]


def test_stale_shards_and_overlapping_globs_are_not_read_twice(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "c.jsonl", [words_doc(5, i) for i in range(20)])
    cfg = MixtureConfig(components=(Component("c", paths=(str(path),)),), weights={"c": 1.0}, tokenizer=str(tok),
                        seq_len=16, batch_size=4, block_size=8)
    out = tmp_path / "out"
    pretokenize(cfg, "c", str(out), num_files=3, processes=1)
    pretokenize(cfg, "c", str(out), num_files=2, processes=1)  # the 3 older shards stay behind
    pre = Component("c", kind="pretokenized", paths=(str(out / "*.array_record"),))
    with pytest.raises(ValueError, match="not written by its last pretokenize run"):
        build(MixtureConfig(components=(pre,), weights={"c": 1.0}, tokenizer=str(tok), seq_len=16, batch_size=4))
    twice = Component("c", paths=(str(path), str(tmp_path / "c.json*")))  # both name c.jsonl
    assert [str(f) for f in expand_paths(twice)] == [str(path)]
