"""The core pipeline: row format, exact token shares, packing, determinism, epochs (resuming: test_data_resume.py)."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from data.config import Component, MixtureConfig
from data import mixture as mixture_module
from data.mixture import ComponentExhausted, Schedule, largest_remainder
from data.pipeline import build
from tests.test_data_util import assert_batches_equal, corpus, mixture, take, write_jsonl  # noqa: F401 (corpus: a fixture)


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
