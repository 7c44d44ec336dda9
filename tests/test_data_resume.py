"""Resuming the pipeline: a fresh process continues exactly from a saved iterator state (also with prefetch, Grain
worker processes and an Orbax checkpoint), and new weights on resume apply from the resumed row."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from data.config import Component, MixtureConfig
from data.pipeline import build
from tests.test_data_util import assert_batches_equal, corpus, mixture, take  # noqa: F401 (corpus: a fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]


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
