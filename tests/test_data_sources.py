"""Config validation, bad input (file:line reports, error budget), start-up errors, other source kinds."""
from __future__ import annotations

import gzip
import json
import logging
import tracemalloc

import numpy as np
import pytest

from data.config import Component, MixtureConfig
from data.pipeline import build
from data.records import BadInputError
from data.tokenize import check_vocab
from tests.test_data_util import word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def cfg(tok, comps, weights=None, **kw) -> MixtureConfig:
    weights = weights or {c.name: 1.0 for c in comps}
    return MixtureConfig(components=tuple(comps), weights=weights, tokenizer=str(tok),
                         **{"seq_len": 8, "batch_size": 2, "block_size": 4, **kw})


def all_text(p, n) -> list[str]:
    out = []
    for _ in range(n):
        b = next(p.iterator)
        for row, seg in zip(b["tokens"], b["segment_ids"]):
            out.append(p.encoder.decode(row[seg > 0]))
    return out


@pytest.mark.parametrize("weights, match", [
    ({"a": 1.0, "zz": 0.5}, r"unknown component\(s\) \['zz'\]"),
    ({"a": -0.1, "b": 1.0}, r"weights\['a'\] must be a finite number >= 0"),
    ({"a": float("nan"), "b": 1.0}, r"weights\['a'\]"),
    ({"a": 0.0, "b": 0.0}, "all weights are zero"),
    ({"a": 1.0}, r"no weight for component\(s\) \['b'\]"),
])
def test_weight_errors_name_the_component(tok, weights, match):
    comps = (Component("a", paths=("x",)), Component("b", paths=("y",)))
    with pytest.raises(ValueError, match=match):
        cfg(tok, comps, weights)


def test_zero_weight_drops_component_and_weights_normalize(tok, tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a b"}])
    comps = (Component("a", paths=(str(a),)), Component("gone", paths=(str(tmp_path / "missing.jsonl"),)))
    with caplog.at_level(logging.WARNING):
        c = cfg(tok, comps, {"a": 3.0, "gone": 0.0})
    assert "normalizing" in caplog.text and c.weights == {"a": 1.0, "gone": 0.0}
    p = build(c)  # the dropped component's missing path is never opened
    assert p.component_names == ("a",)


def test_component_field_errors():
    with pytest.raises(ValueError, match="Component 'x': packing='best' is not one of"):
        Component("x", paths=("p",), packing="best")
    with pytest.raises(ValueError, match="Component 'x': kind='tfds' needs `dataset`"):
        Component("x", kind="tfds")
    with pytest.raises(ValueError, match="Component 'x': max_epochs"):
        Component("x", paths=("p",), max_epochs=0)


def test_bad_records_reported_with_file_and_line_and_skipped(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b"}, {"text": "c d"}, {"text": "   "}, {"body": "x"}],
                       raw_lines={1: b'{"text": "e f"', 2: b'{"text": "caf\xff"}'})
    # lines: 1 ok, 2 malformed, 3 invalid UTF-8, 4 ok, 5 whitespace-only, 6 missing field
    with caplog.at_level(logging.WARNING):
        p = build(cfg(tok, [Component("c", paths=(str(path),), shuffle=False, max_epochs=1)], max_bad_records=3,
                      batch_size=1))
    assert f"{path}:2: malformed JSON" in caplog.text
    assert f"{path}:3: invalid UTF-8" in caplog.text
    assert f"{path}:6: missing text field 'text'" in caplog.text
    assert p.reports["c"].empty == 1 and len(p.reports["c"].bad) == 3
    assert all_text(p, 1) == ["<s> a b </s> <s> c d </s>"]
    stats = p.stats()["components"]["c"]
    assert stats["bad_records"] == 3 and stats["empty_filtered"] == 1
    with pytest.raises(BadInputError, match=r"'c': 3 bad records exceed max_bad_records=2"):
        build(cfg(tok, [Component("c", paths=(str(path),))], max_bad_records=2))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_document_over_the_size_limit_is_a_bad_record_read_in_bounded_memory(tok, tmp_path, caplog, suffix):
    """A 3 MiB one-line document (a file without newlines, say) under a 256 KiB limit: reported with its file, line
    and size, skipped like a malformed record; the others train. Memory: the scan never holds the long line (peak
    Python allocation below the document's size), so a 60 MB document costs no more than a short one."""
    limit = 256 << 10
    huge = {"text": " ".join(f"w{i % 5000}" for i in range(600_000))}  # 3.3 MB of JSON on one line
    records = [{"text": "a b"}, huge, {"text": "c d"}]
    path = tmp_path / f"big{suffix}"
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    config = cfg(tok, [Component("c", paths=(str(path),), shuffle=False, max_epochs=1)], batch_size=1,
                 max_document_bytes=limit)
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING):
            p = build(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = len(json.dumps(huge))
    assert f"{path}:2: a record of {size:,} bytes, over MixtureConfig.max_document_bytes={limit:,}" in caplog.text
    assert len(p.reports["c"].bad) == 1 and p.reports["c"].documents == 2
    assert all_text(p, 1) == ["<s> a b </s> <s> c d </s>"]
    assert peak < size // 2, f"peak Python allocation {peak:,} bytes while scanning a {size:,}-byte line"
    with pytest.raises(ValueError, match="MixtureConfig.max_document_bytes must be >= 1"):
        cfg(tok, [Component("c", paths=(str(path),))], max_document_bytes=0)


def test_startup_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"component 'c': path .*nope\.jsonl.* does not exist"):
        build(cfg(tok, [Component("c", paths=(str(tmp_path / "nope.jsonl"),))]))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": " \n "}])
    with pytest.raises(BadInputError, match="component 'c' has no usable documents.*2 empty"):
        build(cfg(tok, [Component("c", paths=(str(empty),))]))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build(cfg(tmp_path, [Component("c", paths=(str(empty),))]))
    size = check_vocab(tok, 10_000)
    with pytest.raises(ValueError, match=f"has {size} tokens but the model's vocab_size is 100"):
        check_vocab(tok, 100)


def test_gz_and_globs_and_prefix_bos_eos_policy(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", add_bos_token=False)
    (tmp_path / "d").mkdir()
    for i in range(2):
        with gzip.open(tmp_path / "d" / f"part{i}.jsonl.gz", "wt") as f:
            f.write(json.dumps({"body": "a b" if i == 0 else "c"}) + "\n")
    comp = Component("c", paths=(str(tmp_path / "d" / "part*.jsonl.gz"),), text_field="body", shuffle=False,
                     prefix="<DOCTAG> ")
    p = build(cfg(tok, [comp], seq_len=6, batch_size=1))
    assert all_text(p, 1) == ["<DOCTAG> a b </s> <DOCTAG> c"]  # tokenizer config: no BOS; EOS by default
    p = build(cfg(tok, [comp], seq_len=6, batch_size=1, add_bos=True, add_eos=False))
    assert all_text(p, 1) == ["<s> <DOCTAG> a b <s> <DOCTAG>"]
    b = build(cfg(tok, [comp], seq_len=6, batch_size=1, add_eos=False)).iterator
    row = next(b)
    np.testing.assert_array_equal(row["loss_mask"][0], [0, 1, 1, 0, 1, 0])


def test_parquet_array_record_and_hf_disk_sources(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module

    texts = ["a b c", "d e", "f"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "t.array_record"), "group_size:1")
    for t in texts:
        writer.write(json.dumps({"text": t}).encode())
    writer.close()
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    for kind, path in (("parquet", "t.parquet"), ("array_record", "t.array_record"), ("hf_disk", "hf")):
        comp = Component("c", kind=kind, paths=(str(tmp_path / path),), shuffle=False)
        got = all_text(build(cfg(tok, [comp], seq_len=12, batch_size=1)), 1)
        assert got == ["<s> a b c </s> <s> d e </s> <s> f </s>"], kind


def _shard_texts(component: Component, shards: int) -> list[tuple[list[str], object]]:
    """(texts, scan report) of every data shard of a component, each opened on its own as its host would."""
    from data.sources import open_source

    out = []
    for j in range(shards):
        source, report = open_source(component, lambda r: bool(r["text"].strip()), max_bad_records=0, shard=j,
                                     shards=shards)
        out.append(([source[i]["text"] for i in range(len(source))], report))
    return out


@pytest.mark.parametrize("layout", ["jsonl", "jsonl_2gz", "jsonl_4gz", "parquet"])
def test_each_shard_opens_and_parses_only_its_own_records(tmp_path, layout):
    """4 data shards: every record is parsed by exactly one shard (disjoint, union = the corpus), each shard parses
    about a quarter of the records and reads about a quarter of the bytes (gzip: by file, or all bytes when there
    are fewer files than shards), so a host's start-up work does not grow with the corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"doc {i} " + "x" * (i % 13) for i in range(400)]
    parts = [texts[k::4] if layout == "jsonl_4gz" else texts[k * 200:(k + 1) * 200] for k in range(4)]
    if layout == "jsonl":
        files = [write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:150]]),
                 write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[150:]])]
    elif layout.endswith("gz"):
        files = []
        for k in range(2 if layout == "jsonl_2gz" else 4):
            files.append(tmp_path / f"p{k}.jsonl.gz")
            with gzip.open(files[-1], "wt") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in parts[k])
    else:
        files = [tmp_path / "t.parquet"]
        pq.write_table(pa.table({"text": texts}), files[0], row_group_size=25)
    comp = Component("c", kind="parquet" if layout == "parquet" else "jsonl", paths=tuple(map(str, files)))
    shards = _shard_texts(comp, 4)
    seen = [t for got, _ in shards for t in got]
    assert sorted(seen) == sorted(texts) and len(set(seen)) == len(texts)  # disjoint, and nothing lost
    total_bytes = sum(f.stat().st_size for f in files)
    for got, report in shards:
        assert report.records_parsed == len(got) and 95 <= len(got) <= 105
        if layout == "jsonl_2gz":  # 2 files for 4 shards: every shard streams both, parses a quarter of the lines
            assert report.bytes_read == total_bytes
        elif layout == "parquet":  # whole row groups of 25 rows overlapping the shard's 100 rows
            assert 0 < report.bytes_read < pq.ParquetFile(files[0]).metadata.row_group(0).total_byte_size * 5
        else:
            assert 0 < report.bytes_read <= total_bytes / 4 + 100  # plus at most one line past the range end


def test_per_process_parse_counts_in_pipeline_stats(tok, tmp_path):
    """Simulated 4 processes of a 4-shard run: pipeline stats say what each parsed; together exactly the corpus."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"w{i} w{i + 1}"} for i in range(200)])
    config = cfg(tok, [Component("c", paths=(str(path),))], batch_size=4, num_shards=4)
    stats = [build(config, process_index=i, process_count=4).stats()["components"]["c"] for i in range(4)]
    parsed = [s["records_parsed"] for s in stats]  # byte ranges: about a quarter each (lines differ in length)
    assert sum(parsed) == 200 and all(40 <= n <= 60 for n in parsed)
    assert sum(s["bytes_read"] for s in stats) <= path.stat().st_size + 4 * 20
    assert build(config).stats()["components"]["c"]["records_parsed"] == 200
