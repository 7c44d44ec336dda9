"""The core pipeline: row format, exact token shares, determinism, resume (fresh process), weight changes, epochs."""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from data.config import Component, MixtureConfig
from data import mixture as mixture_module
from data.mixture import ComponentExhausted, Schedule, largest_remainder
from data.pipeline import build
from tests.test_data_util import word_tokenizer, words_doc, write_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5])
def test_exact_token_share_short_vs_long_documents(corpus, share):
    block = 1000  # one data shard: its blocks are 10 whole batches (each shard lays out its own blocks)
    cfg = mixture(corpus, {"short": share, "long": 1 - share}, seq_len=128, batch_size=100, block_size=block,
                  num_shards=1)
    p = build(cfg)
    batches = take(p, 100)  # 10,000 rows = 10 blocks
    comp = np.concatenate([b["component"] for b in batches])
    want = largest_remainder([share, 1 - share], block)
    for i in range(10):
        np.testing.assert_array_equal(np.bincount(comp[i * block:(i + 1) * block], minlength=2), want)
    stats = p.stats()
    realized = stats["components"]["short"]["token_share"]
    tokens = sum(c["tokens"] for c in stats["components"].values())
    assert abs(realized - share) <= 10 * 128 / tokens  # one row per block
    real = np.concatenate([(b["segment_ids"] > 0).sum(1) for b in batches])
    assert stats["components"]["short"]["tokens"] == int(real[comp == 0].sum())
    assert stats["rows"] == 10_000 and stats["padding_fraction"] == 0.0


def test_first_fit_rows_are_reweighted_to_token_shares(corpus):
    """First-fit rows of 30-token documents hold 4 documents (120 of 128 tokens), so the mixture gives that component
    proportionally more rows: its measured fill turns token shares into row shares."""
    short = Component("short", paths=(str(corpus["short"]),), packing="first_fit", packing_bins=4)
    long = Component("long", paths=(str(corpus["long"]),))
    p = build(mixture(corpus, {"short": 0.5, "long": 0.5}, components=(short, long), seq_len=128, batch_size=100,
                      block_size=1000))
    take(p, 20)
    stats = p.stats()
    assert stats["components"]["short"]["rows"] > stats["components"]["long"]["rows"]
    assert stats["components"]["short"]["token_share"] == pytest.approx(0.5, abs=2e-3)


def test_rows_concat_then_split_by_hand(corpus):
    comp = Component("t", paths=(str(corpus["tiny"]),), prefix="<DOCTAG> ", loss_weight=0.5, shuffle=False)
    p = build(mixture(corpus, {"t": 1.0}, components=(comp,), seq_len=8, batch_size=2, block_size=4))
    b = next(p.iterator)
    ids = p.encoder.tokenizer.token_to_id
    s, tag, e = ids("<s>"), ids("<DOCTAG>"), ids("</s>")
    a, bb, c, d, ee = (ids(x) for x in "abcde")
    # doc1 = <s> <DOCTAG> a b c </s> (6), doc2 = <s> <DOCTAG> d e </s> (5), then doc1 again (epoch 2).
    np.testing.assert_array_equal(b["tokens"], [[s, tag, a, bb, c, e, s, tag], [d, ee, e, s, tag, a, bb, c]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]])
    w = 0.5
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, w, w, w, w, 0, 0], [w, w, w, 0, 0, w, w, w]])
    assert b["loss_mask"].dtype == np.float32 and b["tokens"].dtype == np.int32
    np.testing.assert_array_equal(b["component"], [0, 0])
    assert p.stats()["components"]["t"]["documents"] == 3  # doc1, doc2, doc1 start in these rows


def test_rows_first_fit_pads_and_splits_long_documents(corpus, tmp_path):
    path = write_jsonl(tmp_path / "ff.jsonl", [{"text": "a b c"}, {"text": "d e"}, {"text": " ".join("abcdefghij")}])
    comp = Component("t", paths=(str(path),), packing="first_fit", packing_bins=2, shuffle=False, max_epochs=1)
    p = build(mixture(corpus, {"t": 1.0}, components=(comp,), seq_len=8, batch_size=1, block_size=4))
    rows = [next(p.iterator) for _ in range(4)]
    with pytest.raises(StopIteration):
        next(p.iterator)
    seg = np.concatenate([r["segment_ids"] for r in rows])
    mask = np.concatenate([r["loss_mask"] for r in rows])
    toks = np.concatenate([r["tokens"] for r in rows])
    assert (mask[seg == 0] == 0).all()
    # 5 + 4 + 12 tokens: the 12-token document becomes consecutive chunks of 8 and 4, nothing dropped.
    assert int((seg > 0).sum()) == 5 + 4 + 12
    decoded = [p.encoder.decode(r["tokens"][0][r["segment_ids"][0] > 0]) for r in rows]
    assert "a b c d e f" in decoded[2] + decoded[3] or any("a b c d e f" in x for x in decoded)
    pos = np.concatenate([r["positions"] for r in rows])
    assert pos.max() <= 7
    assert p.stats()["components"]["t"]["documents"] == 3
    assert p.stats()["padding_fraction"] == pytest.approx(1 - 21 / 32)
    assert toks.dtype == np.int32


def test_determinism_and_seed(corpus):
    cfg = mixture(corpus, {"short": 0.3, "long": 0.7}, seq_len=64, batch_size=8, block_size=16)
    a, b = take(build(cfg), 6), take(build(cfg), 6)
    assert_batches_equal(a, b)
    other = take(build(mixture(corpus, {"short": 0.3, "long": 0.7}, seq_len=64, batch_size=8, block_size=16,
                               seed=1)), 6)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, other))


RESUME_SCRIPT = """
import json, sys
import numpy as np
from data.config import Component, MixtureConfig
from data.pipeline import build
cfg = MixtureConfig(**json.loads(sys.argv[1]))
p = build(cfg)
p.iterator.set_state(json.load(open(sys.argv[2])))
batches = [next(p.iterator) for _ in range(int(sys.argv[3]))]
np.savez(sys.argv[4], **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
json.dump(p.stats(), open(sys.argv[4] + ".stats.json", "w"))
"""


def run_fresh_process(cfg_kwargs: dict, state: dict, n: int, tmp_path: pathlib.Path) -> tuple[list[dict], dict]:
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state))
    out = tmp_path / "next.npz"
    script = RESUME_SCRIPT.replace("MixtureConfig(**json.loads(sys.argv[1]))",
                                   "MixtureConfig(**{**json.loads(sys.argv[1]), 'components': tuple("
                                   "Component(**c) for c in json.loads(sys.argv[1])['components'])})")
    subprocess.run([sys.executable, "-c", script, json.dumps(cfg_kwargs), str(state_file), str(n), str(out)],
                   check=True, cwd=REPO, timeout=120)
    data = np.load(out)
    batches = [{k.split("_", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}_")} for i in range(n)]
    return batches, json.loads((tmp_path / "next.npz.stats.json").read_text())


def test_resume_in_fresh_process_is_exact(corpus, tmp_path):
    comps = [dict(name="short", paths=[str(corpus["short"])]),
             dict(name="long", paths=[str(corpus["long"])], packing="first_fit")]
    kwargs = dict(components=comps, weights={"short": 0.4, "long": 0.6}, tokenizer=str(corpus["tok"]),
                  seq_len=64, batch_size=4, block_size=10, seed=3)
    cfg = MixtureConfig(**{**kwargs, "components": tuple(Component(**c) for c in comps)})
    p = build(cfg)
    take(p, 7)
    state = json.loads(json.dumps(p.iterator.get_state()))
    expected = take(p, 5)
    got, stats = run_fresh_process(kwargs, state, 5, tmp_path)
    assert_batches_equal(expected, [{k: b[k] for k in expected[0]} for b in got])
    assert stats == json.loads(json.dumps(p.stats()))


def test_prefetch_runs_ahead_but_the_state_is_the_position_handed_out(corpus):
    """MixtureConfig.prefetch (on by default): a thread prepares batches ahead, yet the iterator state that checkpoints
    save is the position after the batches handed out, so a resume continues exactly and the stream is prefetch=0's."""
    cfg = mixture(corpus, {"short": 0.4, "long": 0.6}, seq_len=64, batch_size=4, block_size=10)
    assert cfg.prefetch > 0
    plain, ahead = build(dataclasses.replace(cfg, prefetch=0)), build(cfg)
    assert_batches_equal(take(ahead, 6), take(plain, 6))
    assert any(t.name.startswith("grain-thread-prefetch") for t in threading.enumerate())
    state = json.loads(json.dumps(ahead.iterator.get_state()))
    assert state == json.loads(json.dumps(plain.iterator.get_state()))
    resumed = build(cfg)
    resumed.iterator.set_state(state)
    assert_batches_equal(take(resumed, 4), take(plain, 4))
    assert resumed.stats() == plain.stats()
    for p in (ahead, resumed):
        p.iterator.close()


def test_weight_change_on_resume_applies_from_resume_row(corpus):
    """Documented behaviour: new weights start a fresh block grid at the restored row; each component continues
    from its own saved position; saving and restoring again under the new weights keeps that grid."""
    old = mixture(corpus, {"short": 0.5, "long": 0.5}, seq_len=32, batch_size=5, block_size=10)
    new = mixture(corpus, {"short": 0.2, "long": 0.8}, seq_len=32, batch_size=5, block_size=10)
    p = build(old)
    take(p, 3)  # 15 rows: mid-block
    state = p.iterator.get_state()
    cont = take(p, 4)
    next_old = {c: next(r["tokens"][i] for r in cont for i in range(5) if r["component"][i] == c) for c in (0, 1)}

    q = build(new)
    q.iterator.set_state(state)
    after = take(q, 4)
    comp = np.concatenate([b["component"] for b in after])
    np.testing.assert_array_equal(np.bincount(comp[:10], minlength=2), [2, 8])  # first block starts at row 15
    np.testing.assert_array_equal(np.bincount(comp[10:20], minlength=2), [2, 8])
    for c in (0, 1):  # each component's first row after the resume is the one it would have produced next
        first = next(r["tokens"][i] for r in after for i in range(5) if r["component"][i] == c)
        np.testing.assert_array_equal(first, next_old[c])
    # a second resume under the new weights continues the rebased grid exactly
    q2 = build(new)
    q2.iterator.set_state(state)
    take(q2, 2)
    s2 = q2.iterator.get_state()
    q3 = build(new)
    q3.iterator.set_state(s2)
    assert_batches_equal(take(q3, 2), after[2:])


def test_epoch_cap_stop_and_error(corpus):
    capped = Component("tiny", paths=(str(corpus["tiny"]),), max_epochs=2)
    replay = Component("short", paths=(str(corpus["short"]),))
    cfg = mixture(corpus, {"tiny": 0.5, "short": 0.5}, components=(capped, replay), seq_len=4, batch_size=2,
                  block_size=2)
    p = build(cfg)
    n = 0
    with pytest.raises(StopIteration):
        while True:
            next(p.iterator)
            n += 1
            assert n < 100
    tiny = p.stats()["components"]["tiny"]
    # 2 documents x 2 epochs = 22 tokens -> ceil(22/4) = 6 rows, but the pipeline stops at the 7th tiny row:
    assert tiny["documents"] == 4 and tiny["epochs"] == 2.0
    assert tiny["tokens"] <= 22
    err = mixture(corpus, {"tiny": 0.5, "short": 0.5}, seq_len=4, batch_size=2, block_size=2,
                  components=(Component("tiny", paths=(str(corpus["tiny"]),), max_epochs=2, on_exhausted="error"),
                              replay))
    p = build(err)
    with pytest.raises(ComponentExhausted, match="'tiny'.*max_epochs=2"):
        for _ in range(100):
            next(p.iterator)


def test_a_run_shorter_than_one_block_holds_its_shares(corpus):
    """40 rows (10 steps of 4) in 1000-row blocks: the run's end cuts the block short, so every seed gets exactly its
    largest-remainder share of the run (10 rows at 25%, 2 at 5%); an open-ended layout draws them from one block."""
    def short_rows(seed: int, share: float, steps: int | None) -> int:
        cfg = mixture(corpus, {"short": share, "long": 1 - share}, seq_len=32, batch_size=4, block_size=1000,
                      seed=seed, train_steps=steps)
        return int(sum((b["component"] == 0).sum() for b in take(build(cfg), 10)))

    assert {short_rows(seed, 0.25, 10) for seed in range(4)} == {10}
    assert {short_rows(seed, 0.05, 10) for seed in range(4)} == {2}
    assert {short_rows(seed, 0.25, None) for seed in range(4)} != {10}  # a draw from a 1000-row block
    # A longer run: whole 1000-row blocks, then one cut to the run's last 200 rows (300 steps of 4 rows).
    cfg = mixture(corpus, {"short": 0.05, "long": 0.95}, seq_len=32, batch_size=4, block_size=1000, train_steps=300)
    p = build(cfg)
    comp = np.concatenate([b["component"] for b in take(p, 300)])
    assert [int((comp[a:a + 1000] == 0).sum()) for a in (0, 1000)] == [50, 10]
    assert cfg.check_run() is None


def test_a_later_stage_shorter_than_one_block_holds_its_shares(corpus):
    """A stage lays out its own blocks, the last one cut by the run's end: replay only for 8 steps, then 2 steps
    (8 rows) at 25% give every seed exactly 2 of the stage's 8 rows."""
    def cfg(seed: int) -> MixtureConfig:
        return mixture(corpus, {"short": 0.0, "long": 1.0}, seq_len=32, batch_size=4, block_size=1000, seed=seed,
                       stages=((8, {"short": 0.25, "long": 0.75}),), train_steps=10)

    stage_rows = lambda c: int(sum((b["component"] == 0).sum() for b in take(build(c), 10)[8:]))  # noqa: E731
    assert {stage_rows(cfg(seed)) for seed in range(4)} == {2}
    assert cfg(0).stage_rows() == [(0, 8, {"short": 0, "long": 32}), (8, 10, {"short": 2, "long": 6})]


def test_a_share_that_gets_no_row_in_the_run_is_an_error_unless_allowed(corpus):
    """1% of a 40-row run is 0.4 rows: no row at all. That is an error naming the share and the bindings that fix it,
    before anything is read (check_run) and when the pipeline is built; MixtureConfig.allow_unrealized_shares trains
    without the component. Rows that hold a share only roughly (16 rows at 10%: 2 rows) are noted."""
    cfg = mixture(corpus, {"short": 0.01, "long": 0.99}, seq_len=32, batch_size=4, block_size=1000, train_steps=10)
    with pytest.raises(ValueError, match=r"share of 'short' 0\.01 gets no row in the run: 40 rows per data shard "
                                         r"\(10 steps x 4 rows\).*TRAIN_STEPS or BATCH_SIZE.*"
                                         r"MixtureConfig\.allow_unrealized_shares = True"):
        cfg.check_run()
    with pytest.raises(ValueError, match=r"\['short'\].*none of the 40 rows.*allow_unrealized_shares"):
        build(cfg)
    allowed = dataclasses.replace(cfg, allow_unrealized_shares=True)
    assert "'short' 0.01 as 0 rows (0)" in allowed.check_run()  # allowed, and still said
    p = build(allowed)
    take(p, 10)
    assert p.stats()["components"]["short"]["rows"] == 0
    assert dataclasses.replace(cfg, train_steps=50).check_run() is None  # 200 rows: 2 of them
    rough = mixture(corpus, {"short": 0.1, "long": 0.9}, batch_size=2, block_size=1000, train_steps=8)
    assert "'short' 0.1 as 2 rows (0.125)" in rough.check_run()
    assert mixture(corpus, {"short": 0.01, "long": 0.99}, batch_size=4).check_run() is None  # open-ended


def test_schedule_rejects_weight_below_one_row_per_block():
    with pytest.raises(ValueError, match="'b'.*0 of the 100 rows.*block_size"):
        Schedule.from_weights([(0, [0.996, 0.004])], block_size=100, seed=0, shard=0, names=["a", "b"])


def test_a_rounded_share_is_warned_once_whatever_the_shards_and_segments(caplog):
    """Every data shard builds its schedule, and a run's end starts a segment with the same shares: one warning."""
    mixture_module._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="data.mixture"):
        for shard in range(4):
            Schedule.from_weights([(0, [0.923, 0.077])], block_size=10, seed=0, shard=shard, end=80, names=["a", "b"],
                                  allow_empty=True)
    warned = [r.getMessage() for r in caplog.records if "realizes as" in r.getMessage()]
    assert warned == ["component 'a': weight 0.923 realizes as 9/10 rows per block = 0.9 of the rows; pick a "
                      "block_size that makes weight * block_size a whole number (e.g. 1000 for percentages)",
                      "component 'b': weight 0.077 realizes as 1/10 rows per block = 0.1 of the rows; pick a "
                      "block_size that makes weight * block_size a whole number (e.g. 1000 for percentages)"]


@pytest.mark.slow  # ~15-25 s: starts 2 x 2 worker processes
def test_grain_worker_processes_resume_exactly(corpus):
    """worker_count=2: each Grain worker packs and mixes a disjoint slice of every component's document stream."""
    cfg = mixture(corpus, {"short": 0.5, "long": 0.5}, seq_len=32, batch_size=4, block_size=4, worker_count=2)
    p = build(cfg)
    take(p, 3)
    state = p.iterator.get_state()
    expected = take(p, 3)
    q = build(cfg)
    q.iterator.set_state(state)
    assert_batches_equal(take(q, 3), expected)
    for b in expected:  # every batch comes whole from one worker, so block shares hold per batch
        np.testing.assert_array_equal(np.bincount(b["component"], minlength=2), [2, 2])
    assert p.stats()["rows"] == 24
    p.iterator.close()
    q.iterator.close()


@pytest.mark.slow  # ~15 s: starts 3 worker processes
def test_stages_fire_at_their_step_with_grain_workers(corpus):
    """With 3 Grain workers each worker builds every 3rd batch; a stage for step 4 must switch the weights at global
    step 4 (not at step 4 x 3 = 12, where each worker's own row count reaches it), and resume must keep that."""
    cfg = mixture(corpus, {"short": 0.5, "long": 0.5}, seq_len=32, batch_size=4, block_size=4, worker_count=3,
                  stages=((4, {"short": 0.25, "long": 0.75}), (5, {"short": 0.75, "long": 0.25})))
    p = build(cfg)
    batches = take(p, 4)
    state = p.iterator.get_state()
    batches += take(p, 5)
    counts = [np.bincount(b["component"], minlength=2).tolist() for b in batches]
    assert counts == [[2, 2]] * 4 + [[1, 3]] + [[3, 1]] * 4
    q = build(cfg)
    q.iterator.set_state(state)
    assert_batches_equal(take(q, 5), batches[4:])
    p.iterator.close()
    q.iterator.close()


def test_orbax_checkpoint_round_trip_and_stages(corpus, tmp_path):
    """The iterator saves/restores through grain.checkpoint in an Orbax Composite; a stage switches weights at its
    step (rows per shard * step), with blocks laid out from the stage start."""
    import grain
    import orbax.checkpoint as ocp

    cfg = mixture(corpus, {"short": 0.5, "long": 0.5}, seq_len=32, batch_size=4, block_size=8,
                  stages=((3, {"short": 0.25, "long": 0.75}),))
    p = build(cfg)
    first = take(p, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(p.iterator)))
        mngr.wait_until_finished()
        expected = take(p, 4)
        q = build(cfg)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(q.iterator)))
    assert_batches_equal(take(q, 4), expected)
    comp = np.concatenate([b["component"] for b in first + expected])
    np.testing.assert_array_equal(np.bincount(comp[:8], minlength=2), [4, 4])  # block 0 under stage 0
    np.testing.assert_array_equal(np.bincount(comp[12:20], minlength=2), [2, 6])  # stage 1 from row 12 = step 3


@pytest.mark.parametrize("packing", ["concat_then_split", "first_fit"])
def test_packers_skip_documents_that_tokenize_to_nothing(packing):
    import grain

    from data.packing import PackedRowsIterDataset

    def doc(tokens):
        t = np.asarray(tokens, np.int32)
        return {"tokens": t, "weights": np.ones(len(t), np.float32), "doc_pos": np.arange(len(t), dtype=np.int32)}

    docs = grain.MapDataset.source([doc([5, 6]), doc([]), doc([7, 8, 9])])
    rows = list(PackedRowsIterDataset(docs, Component("c", paths=("x",), packing=packing), 8))
    assert len(rows) == 1
    np.testing.assert_array_equal(rows[0]["tokens"], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 2, 2, 2, 0, 0, 0])
    assert rows[0]["_documents"] == 2
