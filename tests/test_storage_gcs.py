"""gs:// end to end against a local GCS emulator: train.py with MODEL_DIR and corpora in a bucket writes everything
there (nothing to the working directory), and a "fresh machine" resumes from the bucket exactly."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import extras, gcs_emulator

pytestmark = extras.require("gcs")

import storage  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = f"gs://{gcs_emulator.BUCKET}/data"
TINY = ["--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32",
        "--gin.CHECKPOINT_EVERY=2", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=None",
        "--gin.RunConfig.eval_mixture=None", "--gin.TrainConfig.peak_flops=1e12", "--gin.TrainConfig.progress_bar=False",
        # constant schedule and open-ended mixture layout: neither the learning rate nor the rows of a step depend on
        # TRAIN_STEPS, so 2 steps then 4 == 4 steps
        "--gin.OptimizerConfig.schedule='constant'", "--gin.OptimizerConfig.warmup_steps=0",
        "--gin.MixtureConfig.train_steps=None",
        f"--gin.replay/Component.paths=('{DATA}/replay.jsonl',)",
        f"--gin.synthetic/Component.paths=('{DATA}/welfare*.jsonl',)",
        f"--gin.MixtureConfig.tokenizer='{DATA}/tokenizer'"]


@pytest.fixture(scope="module")
def bucket(gcs):
    """The emulator with the demo corpora and tokenizer uploaded to gs://bucket/data."""
    from trainer.demo_assets import demo_asset

    storage.copy_file(demo_asset("replay"), f"{DATA}/replay.jsonl")
    storage.copy_file(demo_asset("welfare"), f"{DATA}/welfare.jsonl")
    storage.upload_tree(demo_asset("tokenizer"), f"{DATA}/tokenizer")
    return gcs


def fresh_machine(tmp_path: pathlib.Path, url: str, name: str) -> tuple[pathlib.Path, dict]:
    """(an empty working dir, an environment whose caches and temp dirs are empty folders under it)."""
    home = tmp_path / name
    for sub in ("work", "cache", "tmp"):
        (home / sub).mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=pythonpath,
               DOCMIX_CACHE=str(home / "cache"), DOCMIX_STORAGE_CACHE=str(home / "cache"), TMPDIR=str(home / "tmp"),
               HOME=str(home), **gcs_emulator.client_env(url))
    return home / "work", env


def train(model_dir: str, steps: int, cwd: pathlib.Path, env: dict) -> None:
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train.py exited {proc.returncode}:\n{proc.stderr[-4000:]}"


def losses(model_dir: str) -> dict[int, float]:
    recs = [json.loads(line) for line in storage.Path(f"{model_dir}/metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def local_files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow  # ~90 s on an idle 2-core machine: three short train.py runs against the emulator
def test_gs_model_dir_and_corpora_resume_on_a_fresh_machine(bucket, tmp_path):
    reference = f"gs://{gcs_emulator.BUCKET}/reference"
    run = f"gs://{gcs_emulator.BUCKET}/run"
    cwd, env = fresh_machine(tmp_path, bucket, "reference")
    train(reference, 4, cwd, env)

    cwd, env = fresh_machine(tmp_path, bucket, "first")
    train(run, 2, cwd, env)
    assert local_files(cwd) == []  # nothing lands in the working directory (no ./gs:/bucket/run)
    root = storage.Path(run)
    assert (root / "checkpoints" / "2" / "params").is_dir()
    assert (root / "checkpoints" / "2" / "data").is_dir()  # the Grain iterator state (epath -> gcsfs)
    assert "opt_state" in [p.name for p in (root / "checkpoints" / "2").iterdir()]
    assert (root / "config.gin").read_text().count("MODEL_DIR") >= 1
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    assert (root / "hf" / "config.json").is_file() and (root / "hf" / "model.safetensors").is_file()
    assert (root / "hf" / "tokenizer.json").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (root / "tb").iterdir())
    assert sorted(losses(run)) == [1, 2]

    # A new machine: new process, empty working dir, empty caches; the same command, trained further.
    cwd, env = fresh_machine(tmp_path, bucket, "second")
    train(run, 4, cwd, env)
    assert local_files(cwd) == []
    assert losses(run) == losses(reference)  # resumed from the bucket's step 2: bit-identical floats
    assert (root / "hf" / "model.safetensors").read_bytes() == \
        storage.Path(reference, "hf", "model.safetensors").read_bytes()


def test_a_checkpoint_is_written_after_the_metrics_of_its_steps(bucket, tmp_path):
    """A run preempted right after checkpoint k committed resumes at k and never redoes steps 1..k, so their
    records must be stored by then or they are missing for good. The bucket refuses the first two uploads of
    records (the writer retries after 1 s and 2 s): nothing of checkpoint 2 is written before they are stored."""
    from trainer import metrics_file

    cwd, env = fresh_machine(tmp_path, bucket, "slow-metrics")
    with gcs_emulator.recording() as served, \
            gcs_emulator.failing("ordered/metrics.jsonl.parts/", 2, handlers=("insert",)) as fault:
        train(f"gs://{gcs_emulator.BUCKET}/ordered", 2, cwd, env)
    assert fault.times == 0
    names = [(r.handler, r.name or "") for r in served]
    stored = next(i for i, (h, n) in enumerate(names) if h == "insert" and n.startswith("ordered/metrics.jsonl.parts/"))
    checkpoint = next(i for i, (_, n) in enumerate(names) if n.startswith("ordered/checkpoints/2"))
    assert stored < checkpoint, names[stored:checkpoint + 1]
    assert [r["step"] for r in metrics_file.read(f"gs://{gcs_emulator.BUCKET}/ordered/metrics.jsonl")] == [1, 2]


def test_storage_helpers_on_the_emulator(bucket, tmp_path):
    """byte ranges, atomic writes, recursive listings, local copies of remote files/folders, upload order, mirrors."""
    target = storage.Path(f"gs://{gcs_emulator.BUCKET}/helpers/log.jsonl")
    with storage.atomic_write(target) as f:
        f.write("a\nb\n")
    assert target.read_text() == "a\nb\n" and storage.read_range(target, 1, 3) == b"\nb"
    assert storage.local_file(target).read_text() == "a\nb\n"
    assert not storage.is_remote(storage.local_file(target))
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "src" / "sub" / "w.bin").write_bytes(b"\0\1")
    storage.upload_tree(tmp_path / "src", f"gs://{gcs_emulator.BUCKET}/helpers/tree", last=("config.json",))
    copy = storage.local_dir(f"gs://{gcs_emulator.BUCKET}/helpers/tree")
    assert local_files(copy) == ["config.json", "sub", "sub/w.bin"] and (copy / "sub" / "w.bin").read_bytes() == b"\0\1"
    assert storage.list_files(f"gs://{gcs_emulator.BUCKET}/helpers/tree") == storage.list_files(copy) == \
        ["config.json", "sub/w.bin"]
    mirror = storage.LocalMirror(f"gs://{gcs_emulator.BUCKET}/helpers/tb")
    (mirror.local / "events").write_bytes(b"x")
    mirror.sync()
    assert storage.Path(f"gs://{gcs_emulator.BUCKET}/helpers/tb/events").read_bytes() == b"x"
    (mirror.local / "events").write_bytes(b"xy")
    mirror.close()
    assert storage.Path(f"gs://{gcs_emulator.BUCKET}/helpers/tb/events").read_bytes() == b"xy"
    assert storage.join("gs://b/r", "checkpoints", "2") == "gs://b/r/checkpoints/2"


def test_gs_corpora_are_read_per_shard(bucket, tmp_path):
    """JSONL (plain: byte ranges streamed from the bucket; .gz: streamed through the decompressor) and Parquet on gs://:
    three shards parse disjoint records whose union is the corpus."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.config import Component
    from data.sources import open_source

    texts = [f"doc {i} " + "y" * (i % 17) for i in range(90)]
    root = f"gs://{gcs_emulator.BUCKET}/shards"
    storage.Path(f"{root}/a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:50]))
    storage.Path(f"{root}/b.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[50:]).encode()))
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=10)
    storage.copy_file(tmp_path / "t.parquet", f"{root}/t.parquet")
    for comp in (Component("c", paths=(f"{root}/a.jsonl", f"{root}/b.jsonl.gz")),
                 Component("c", kind="parquet", paths=(f"{root}/t.parquet",))):
        seen = []
        for j in range(3):
            source, report = open_source(comp, lambda r: True, max_bad_records=0, shard=j, shards=3)
            got = [source[i]["text"] for i in range(len(source))]
            assert report.records_parsed == len(got) and 20 <= len(got) <= 40, comp.kind
            seen += got
        assert sorted(seen) == sorted(texts), comp.kind


def remote_files(root: str) -> dict[str, bytes]:
    """relative name -> bytes of every object under `root`."""
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    return {name[len(path) + 1:]: fs.cat_file(name) for name in fs.find(path)}


def test_damaged_gs_checkpoint_is_set_aside_whole_and_the_previous_one_resumes(bucket, tmp_path, monkeypatch):
    """Object stores have no rename: the damaged step is copied to checkpoints_set_aside/ and then deleted, every
    object kept byte for byte, and the run resumes from the step before it. (The checkpoints are written locally and
    uploaded: saving through tensorstore's gcs driver is covered by the train.py test above.)"""
    from tests.test_checkpoint_health import resume, save_steps
    from trainer import checkpoint, checkpoint_health

    monkeypatch.setattr(checkpoint, "RESTORE_BACKOFF_S", 0.01)  # a damaged step is read 3 times before it is judged

    model_dir = f"gs://{gcs_emulator.BUCKET}/damaged"
    mesh = save_steps(tmp_path, [2, 4])
    storage.upload_tree(tmp_path / "checkpoints", f"{model_dir}/checkpoints")
    storage.Path(f"{model_dir}/checkpoints/4/metadata/metadata").unlink()
    before = remote_files(f"{model_dir}/checkpoints/4")
    assert before
    assert resume(model_dir, mesh) == (2, 2)
    kept = f"{model_dir}/{checkpoint_health.SET_ASIDE}/4"
    after = remote_files(kept)
    assert "damaged" in after.pop("reason.txt").decode()
    assert after == before
    assert remote_files(f"{model_dir}/checkpoints/4") == {}
    assert resume(model_dir, mesh) == (2, 2)  # and again: nothing left at step 4 to trip over


def test_writer_lock_on_gs(bucket, caplog):
    """The MODEL_DIR writer lock on a bucket: an atomic create-if-absent (GCS's ifGenerationMatch=0), a second writer
    refused, a lock not renewed for the lease broken, release leaving someone else's lock alone."""
    import time

    from tests.test_run_lock import Interleaved
    from trainer import run_lock

    model_dir = f"gs://{gcs_emulator.BUCKET}/locked"
    lock_file = storage.Path(f"{model_dir}/{run_lock.LOCK_NAME}")
    store = run_lock.ObjectStore(model_dir)

    def holder() -> dict:
        # One GET, as the lock itself reads: epath's read_text opens the object (its size from one request, then
        # ranged reads), so a renewal in between returned the new bytes cut to the old length (torn JSON in CI).
        return json.loads(store.read(str(lock_file))[0])

    assert store.create_exclusive(f"{model_dir}/x", b"first") and not store.create_exclusive(f"{model_dir}/x", b"2nd")
    data, generation = store.read(f"{model_dir}/x")
    assert data == b"first"  # the refused create wrote nothing
    assert store.replace(f"{model_dir}/x", b"second", generation)  # compare-and-swap: GCS generation preconditions
    assert not store.replace(f"{model_dir}/x", b"third", generation) and not store.delete(f"{model_dir}/x", generation)
    assert store.read(f"{model_dir}/x")[0] == b"second"
    assert store.delete(f"{model_dir}/x", store.read(f"{model_dir}/x")[1]) and store.read(f"{model_dir}/x") is None
    with run_lock.RunLock(model_dir, renew_s=0.05) as lock:
        assert holder()["token"] == lock.record["token"]
        with pytest.raises(run_lock.RunLocked, match="another run is writing"):
            run_lock.RunLock(model_dir).acquire()
        first = holder()["heartbeat"]
        deadline = time.time() + 30
        while holder()["heartbeat"] == first:  # renewed in the bucket
            assert time.time() < deadline
            time.sleep(0.05)
    assert not lock_file.exists()
    lock_file.write_text(json.dumps({"host": "tpu-vm-7", "pid": 1, "started": 0,
                                     "heartbeat": time.time() - run_lock.LEASE_S - 5}))
    with run_lock.RunLock(model_dir):  # the vanished VM's lock is broken
        assert holder()["host"] != "tpu-vm-7"
    assert "breaking the stale lock" in caplog.text
    theirs = json.dumps({"host": "tpu-vm-7", "pid": 1, "started": 0, "heartbeat": time.time()})
    lock_file.write_text(theirs)
    run_lock.RunLock(model_dir).release()
    assert holder()["host"] == "tpu-vm-7"

    # Another run takes the lock between the renewer's read and its write: the renewal (ifGenerationMatch) fails,
    # the holder knows it lost the lock, and the other run's lock is never overwritten.
    lock_file.unlink()
    lock = run_lock.RunLock(model_dir, Interleaved(store, 1, lambda: lock_file.write_text(theirs)), renew_s=0.05)
    lock.acquire()
    lock._renewer.join(timeout=60)
    assert "tpu-vm-7" in lock.lost and holder()["host"] == "tpu-vm-7"
    lock.release()
    assert holder()["host"] == "tpu-vm-7"


def test_pretokenized_shards_on_gs(bucket, tmp_path):
    """`data.pretokenize --output_dir gs://...` and reading those shards back: the same batches as the raw corpus,
    and each data shard copies only the ArrayRecord files that hold its records (the reader opens local files)."""
    import numpy as np

    from data.config import Component, MixtureConfig
    from data.pipeline import build
    from data.pretokenize import open_pretokenized, pretokenize
    from tests.test_data_util import word_tokenizer, words_doc, write_jsonl

    tok = word_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "c.jsonl", [words_doc(3 + i % 11, i) for i in range(60)])
    config = MixtureConfig(components=(Component("c", paths=(str(path),)),), weights={"c": 1.0}, tokenizer=str(tok),
                           seq_len=16, batch_size=4, block_size=8)
    out = f"gs://{gcs_emulator.BUCKET}/pretokenized"
    meta = pretokenize(config, "c", out, num_files=4, processes=1)
    assert meta["file_documents"] == [15, 15, 15, 15]
    pre = Component("c", kind="pretokenized", paths=(f"{out}/*.array_record",))
    raw, remote = build(config), build(dataclasses.replace(config, components=(pre,)))
    for _ in range(12):  # past one epoch
        x, y = next(raw.iterator), next(remote.iterator)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    file_bytes = storage.Path(f"{out}/{meta['files'][0]}").stat().length
    seen = []
    for shard in range(4):  # 4 data shards of 15 documents: exactly one file each
        source, _, report = open_pretokenized(pre, str(tok), shard, 4)
        seen += [bytes(source[i]) for i in range(len(source))]
        assert len(source) == 15 and report.bytes_read < 1.5 * file_bytes, (shard, report)
    whole, _, _ = open_pretokenized(pre, str(tok))
    assert seen == [bytes(whole[i]) for i in range(len(whole))]
