"""Multi-host: disjoint per-process shards whose union is the one-process stream; global jax.Arrays."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from data.config import Component, MixtureConfig
from data.multihost import global_batch
from data.pipeline import DataStateMismatch, build, merge_process_states
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
    with pytest.raises(DataStateMismatch, match=r"holds data shards \[1\], not this process's \[0\]"):
        procs[0].iterator.set_state(procs[1].iterator.get_state())


def batches(pipes, n: int) -> list[dict[str, np.ndarray]]:
    """The next `n` global batches: each pipeline's rows stacked in process order."""
    out = []
    for _ in range(n):
        parts = [next(p.iterator) for p in pipes]
        out.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
    return out


def resumed(cfg: MixtureConfig, states: list[dict], process_count: int) -> list:
    """Pipelines of `process_count` processes restored from the states every process of another run saved."""
    pipes = [build(cfg, process_index=i, process_count=process_count) for i in range(process_count)]
    for p in pipes:
        p.iterator.set_state(merge_process_states(json.loads(json.dumps(states))))  # as read back from JSON files
    return pipes


def test_default_shards_give_one_global_stream_that_resumes_on_another_process_count(tmp_path):
    """Without MixtureConfig.num_shards the shard count is a function of the batch alone (16 rows: 2 shards), so 1 and
    2 processes read the same global batches, and the iterator states saved by 2 processes restore on 1 and the
    reverse, continuing exactly (with the realized counts) where an uninterrupted reader is."""
    tok = word_tokenizer(tmp_path / "tok")
    a = write_jsonl(tmp_path / "a.jsonl", [words_doc(5 + i % 7, i) for i in range(60)])
    b = write_jsonl(tmp_path / "b.jsonl", [words_doc(30 + i, 100 + i) for i in range(20)])
    cfg = MixtureConfig(components=(Component("a", paths=(str(a),)), Component("b", paths=(str(b),))),
                        weights={"a": 0.75, "b": 0.25}, tokenizer=str(tok), seq_len=16, batch_size=16, block_size=8)
    assert cfg.shards(1) == cfg.shards(2) == 2
    uninterrupted = batches([build(cfg)], 6)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(uninterrupted, batches(
        [build(cfg, process_index=i, process_count=2) for i in range(2)], 6)) for k in x)

    two = [build(cfg, process_index=i, process_count=2) for i in range(2)]
    batches(two, 3)
    one = resumed(cfg, [p.iterator.get_state() for p in two], 1)
    for got, want in zip(batches(one, 3), uninterrupted[3:]):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert one[0].stats()["components"] == build_and_read(cfg, 6).stats()["components"]

    single = build(cfg)
    batches([single], 2)
    again = resumed(cfg, [single.iterator.get_state()], 2)
    for got, want in zip(batches(again, 4), uninterrupted[2:]):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    rows = [p.stats()["rows"] for p in again]
    assert rows == [8 * 6, 8 * 6]   # each process: its shard's 8 rows of all 6 batches read so far

    with pytest.raises(DataStateMismatch, match=r"saved with 2 data shards, .*--gin.MixtureConfig.num_shards=2 to"):
        build(dataclasses.replace(cfg, num_shards=4)).iterator.set_state(single.iterator.get_state())
    workers = dataclasses.replace(cfg, worker_count=1, prefetch=0)
    saved = build(workers, process_index=0, process_count=2)
    next(saved.iterator)
    with pytest.raises(DataStateMismatch, match="worker_count > 0.*resume it on 2 processes"):
        merge_process_states([saved.iterator.get_state()] * 2)


def build_and_read(cfg: MixtureConfig, n: int):
    pipe = build(cfg)
    batches([pipe], n)
    return pipe


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


def test_a_checkpoint_of_another_shard_count_is_refused_naming_the_fix_not_set_aside(tmp_path):
    """Resuming with another MixtureConfig.num_shards cannot continue the data order: one line naming the fix
    (exit 2), and the checkpoint is not taken for damage (it stays where it is)."""
    from tests.test_checkpoint_health import INITIAL, MESH, TINY, TX
    from trainer import checkpoint, state as state_lib
    from trainer.run_config import CheckpointConfig

    tok = word_tokenizer(tmp_path / "tok")
    a = write_jsonl(tmp_path / "a.jsonl", [words_doc(5 + i % 7, i) for i in range(40)])
    cfg = MixtureConfig(components=(Component("a", paths=(str(a),)),), weights={"a": 1.0}, tokenizer=str(tok),
                        seq_len=16, batch_size=8, num_shards=2)
    saved = build(cfg)
    next(saved.iterator)
    ckpt = checkpoint.Checkpointer(tmp_path / "run", CheckpointConfig(async_save=False), TINY)
    ckpt.save(INITIAL, saved.iterator, {"step": 1})
    ckpt.close()

    ckpt = checkpoint.Checkpointer(tmp_path / "run", CheckpointConfig(), TINY)
    with pytest.raises(DataStateMismatch, match=r"saved with 2 data shards, .*num_shards=2 to continue"):
        ckpt.restore_resumable(state_lib.abstract(TINY, TX), MESH,
                               build(dataclasses.replace(cfg, num_shards=None)).iterator, lambda meta, step: None)
    ckpt.close()
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
