"""Multi-host: disjoint per-process shards whose union is the one-process stream; global jax.Arrays."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from data.config import Component, MixtureConfig
from data.multihost import global_batch
from data.pipeline import build
from tests.test_data_util import word_tokenizer, words_doc, write_jsonl


def test_two_processes_are_disjoint_and_stack_to_one_process_stream(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    a = write_jsonl(tmp_path / "a.jsonl", [words_doc(5 + i % 7, i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [words_doc(40 + i, 100 + i) for i in range(10)])
    cfg = MixtureConfig(components=(Component("a", paths=(str(a),)), Component("b", paths=(str(b),))),
                        weights={"a": 0.3, "b": 0.7}, tokenizer=str(tok), seq_len=16, batch_size=8, block_size=8,
                        num_shards=2)
    one = build(cfg)
    procs = [build(cfg, process_index=i, process_count=2) for i in range(2)]
    seen = [set(), set()]
    for _ in range(5):
        full = next(one.iterator)
        parts = [next(p.iterator) for p in procs]
        for key in full:
            np.testing.assert_array_equal(full[key], np.concatenate([parts[0][key], parts[1][key]]), err_msg=key)
        for i, part in enumerate(parts):
            for toks, seg, pos in zip(part["tokens"], part["segment_ids"], part["positions"]):
                for s in range(1, seg.max() + 1):
                    if (seg == s).sum() >= 3:  # (a row can end in a lone BOS: no document's identity)
                        seen[i].add(tuple(toks[seg == s][:3]))
    assert not seen[0] & seen[1]  # the two processes read disjoint documents
    assert procs[0].stats()["rows"] == procs[1].stats()["rows"] == 20
    assert one.stats()["components"]["a"]["rows"] == sum(p.stats()["components"]["a"]["rows"] for p in procs)
    with pytest.raises(ValueError, match="saved for data shards"):
        procs[0].iterator.set_state(procs[1].iterator.get_state())


def test_global_batch_sharding():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    local = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3), "component": np.arange(8, dtype=np.int32)}
    out = global_batch(local, mesh, PartitionSpec("data"))
    assert out["tokens"].shape == (8, 3)
    assert out["tokens"].sharding == NamedSharding(mesh, PartitionSpec("data", None))
    assert out["component"].sharding == NamedSharding(mesh, PartitionSpec("data"))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])
    both = global_batch(local, mesh, PartitionSpec(("data", "model")))
    assert both["tokens"].sharding.spec == PartitionSpec(("data", "model"), None)
    assert len(both["tokens"].addressable_shards) == 8
