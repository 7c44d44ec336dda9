"""A bucket as a run's disk, against the local GCS emulator: metrics records cost the same however long the run and a
failing bucket never ends it; a transient error while restoring does not set the newest checkpoint aside; exports
keep every object they did not write and a complete export can always be read."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests import extras, gcs_emulator

pytestmark = extras.require("gcs")

import storage  # noqa: E402
from tests.test_export_target import orbax_to_hf, run_dir  # noqa: E402,F401 - run_dir is a fixture
from trainer import metrics, metrics_file  # noqa: E402

ROOT = "run_disk"  # this module's prefix in the bucket
URL = f"gs://{gcs_emulator.BUCKET}/{ROOT}"


def records(steps) -> list[dict]:
    return [{"step": s, "loss": 1.25, "tokens": 1000 * s} for s in steps]


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_each_metrics_record_costs_the_same_on_gs(gcs):
    """One part upload of the new records, one compose and one delete per batch: what a record costs does not grow
    with metrics.jsonl (rewriting the object per record sent the whole file every time)."""
    path = f"{URL}/flat/metrics.jsonl"
    out = metrics_file.MetricsFile(path)
    with gcs_emulator.recording() as served:
        for rec in records(range(1, 61)):
            out.append([rec])
    uploads = [r.sent for r in served if r.handler == "insert"]
    assert len(uploads) == 60 and max(uploads) - min(uploads) <= 2  # the record itself, not the file
    assert len(served) <= 60 * 4
    assert metrics_file.read(path) == records(range(1, 61))
    assert storage.list_files(metrics_file.parts_dir(path)) == []


def test_a_failing_bucket_delays_metrics_but_never_loses_them_or_ends_the_run(gcs, monkeypatch, caplog):
    """Uploads of record parts fail (3 attempts for the first record, 1 more for the second): the records are kept
    and written with the next one, in order, each once. A compose that fails leaves parts that readers see, and the
    next batch (or close) appends them."""
    monkeypatch.setattr(metrics.Sinks, "BACKOFF_S", 0.01)
    model_dir = f"{URL}/failing"
    sinks = metrics.Sinks(model_dir, resume_step=0, run_name="failing")
    path = f"{model_dir}/metrics.jsonl"
    with gcs_emulator.failing(f"{ROOT}/failing/metrics.jsonl.parts/", 4, handlers=("insert",)) as fault:
        sinks.write(records([1])[0])
        wait_for(lambda: "could not write 1 metrics record" in caplog.text, "the first failed write to be logged")
        assert metrics_file.read(path) == []
        sinks.write(records([2])[0])
        wait_for(lambda: fault.times == 0 and len(metrics_file.read(path)) == 2, "records 1 and 2")
    with gcs_emulator.failing(f"{ROOT}/failing/metrics.jsonl", 1, handlers=("compose",)):
        sinks.write(records([3])[0])
        wait_for(lambda: len(metrics_file.read(path)) == 3, "record 3, in its part")
    assert storage.list_files(metrics_file.parts_dir(path))  # not composed yet, read all the same
    sinks.write(records([4])[0])
    sinks.close()
    assert metrics_file.read(path) == records([1, 2, 3, 4])
    assert storage.Path(path).read_text() == "".join(json.dumps(r) + "\n" for r in records([1, 2, 3, 4]))
    assert storage.list_files(metrics_file.parts_dir(path)) == []


def test_tensorboard_events_are_uploaded_once_each(gcs):
    """On gs:// the event file is closed and uploaded at each sync and a new one started: no file is uploaded twice
    (re-uploading a growing file every record is quadratic)."""
    model_dir = f"{URL}/tensorboard"
    with gcs_emulator.recording() as served:
        sinks = metrics.Sinks(model_dir, resume_step=0, run_name="tensorboard", tb_sync_s=0.0)
        for rec in records(range(1, 6)):
            sinks.write(rec)
            wait_for(lambda: sinks._queue.empty(), "the writer to take the record")
        sinks.close()
    events = [r.name for r in served if r.handler == "insert" and r.sent and "/tb/" in r.name]  # data, not session
    assert len(events) >= 2 and len(events) == len(set(events))
    assert sorted(storage.list_files(f"{model_dir}/tb")) == sorted(e.rsplit("/", 1)[1] for e in events)


def test_truncate_after_folds_leftover_parts_in(gcs):
    path = f"{URL}/truncate/metrics.jsonl"
    storage.Path(path).write_text("".join(json.dumps(r) + "\n" for r in records([1, 2])))
    for n, steps in ((1, [2, 3]), (2, [4])):  # a part composed but not deleted (step 2), two never composed
        (metrics_file.parts_dir(path) / f"{n:012d}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records(steps)))
    assert metrics_file.read(path) == records([1, 2, 3, 4])
    metrics_file.truncate_after(path, 3)
    assert metrics_file.read(path) == records([1, 2, 3])
    assert storage.list_files(metrics_file.parts_dir(path)) == []


def test_a_torn_record_in_metrics_or_a_part_is_dropped_and_the_resume_rewrite_leaves_whole_lines(gcs, caplog):
    """metrics.jsonl and a part each end in a torn record (as copied from a file a kill cut short): readers drop each
    with a warning naming its object and line, and the rewrite at resume folds the rest in, whole lines again. A
    malformed line in a part that is not its last is an error naming the part and line."""
    from tests.test_metrics_file import lines, records as metrics_records, torn, warnings

    path = f"{URL}/torn/metrics.jsonl"
    parts = metrics_file.parts_dir(path)
    storage.Path(path).write_text(lines([1, 2]) + torn(3))
    (parts / f"{1:012d}.jsonl").write_text(lines([3]) + torn(4))
    (parts / f"{2:012d}.jsonl").write_text(lines([4, 5]))
    assert metrics_file.read(path) == metrics_records([1, 2, 3, 4, 5])
    assert sorted(w.split(": ")[0] for w in warnings(caplog)) == sorted([f"{path}:3", f"{parts}/{1:012d}.jsonl:2"])
    metrics_file.truncate_after(path, 4)
    metrics_file.MetricsFile(path).append(metrics_records([5]))
    assert storage.Path(path).read_text() == lines([1, 2, 3, 4, 5])
    assert storage.list_files(parts) == []
    (parts / f"{3:012d}.jsonl").write_text(lines([6]) + torn(7) + "\n" + lines([8]))
    with pytest.raises(ValueError, match=f"^{parts}/{3:012d}.jsonl:2: invalid JSON"):
        metrics_file.read(path)


def test_a_transient_error_while_restoring_is_retried_and_the_newest_checkpoint_resumes(gcs, tmp_path, monkeypatch,
                                                                                          caplog):
    """Reads of the newest checkpoint fail (an error the storage clients do not retry) on the first attempts: it is
    retried and resumed, not set aside. Failing on every attempt, it counts as damaged and the previous one resumes."""
    from tests.test_checkpoint_health import resume, save_steps
    from trainer import checkpoint, checkpoint_health

    monkeypatch.setattr(checkpoint, "RESTORE_BACKOFF_S", 0.01)
    model_dir = f"{URL}/transient"
    mesh = save_steps(tmp_path, [2, 4])
    storage.upload_tree(tmp_path / "checkpoints", f"{model_dir}/checkpoints")
    newest = f"{ROOT}/transient/checkpoints/4/"
    with gcs_emulator.failing(newest, checkpoint.RESTORE_ATTEMPTS - 1, handlers=("download",)) as fault:
        assert resume(model_dir, mesh) == (4, 4)
    assert fault.times == 0 and "retrying" in caplog.text
    assert not storage.Path(f"{model_dir}/{checkpoint_health.SET_ASIDE}").exists()
    with gcs_emulator.failing(newest, 10**6, handlers=("download",)):
        assert resume(model_dir, mesh) == (2, 2)
    reason = storage.Path(f"{model_dir}/{checkpoint_health.SET_ASIDE}/4/reason.txt").read_text()
    assert "damaged" in reason and "Forbidden" in reason


def objects(root: str) -> dict[str, bytes]:
    return {name: storage.Path(root, name).read_bytes() for name in storage.list_files(root)}


def test_gs_exports_keep_every_object_they_did_not_write(gcs, run_dir, capsys):  # noqa: F811
    out = f"{URL}/exports/hf"
    assert orbax_to_hf(run_dir, out) == 0
    storage.Path(out, "notes.txt").write_text("mine")                      # the user added a file
    before = objects(out)
    assert orbax_to_hf(run_dir, out, "--overwrite") == 2
    assert "notes.txt" in capsys.readouterr().err and objects(out) == before
    storage.Path(out, "notes.txt").unlink()
    assert orbax_to_hf(run_dir, out, "--overwrite", "--dtype", "float32") == 0
    marker = json.loads(storage.Path(out, "docmix_export.json").read_text())
    assert marker["dtype"] == "float32" and "replacing" not in marker
    assert sorted(marker["files"]) == sorted(set(storage.list_files(out)) - {"docmix_export.json"})
    assert storage.list_files(f"{URL}/exports") == [f"hf/{name}" for name in storage.list_files(out)]  # no sibling


def test_gs_hf_to_orbax_overwrites_nothing_and_writes_beside_what_out_holds(gcs, run_dir, tmp_path,  # noqa: F811
                                                                            capsys):
    from tests.test_convert import hf_to_orbax
    from trainer import checkpoint

    hf = tmp_path / "hf"
    assert orbax_to_hf(run_dir, hf, "--dtype", "float32") == 0
    out = f"{URL}/converted"
    storage.Path(out, "tokenizer", "tokenizer.json").write_text("mine")
    storage.Path(out, "README.md").write_text("my notes")
    assert hf_to_orbax(hf, out) == 2
    err = capsys.readouterr().err
    assert "tokenizer/tokenizer.json" in err and err.count("\n") == 1
    assert storage.Path(out, "tokenizer", "tokenizer.json").read_text() == "mine"
    storage.Path(out, "tokenizer", "tokenizer.json").unlink()
    assert hf_to_orbax(hf, out) == 0
    assert storage.Path(out, "README.md").read_text() == "my notes"
    np.testing.assert_array_equal(np.asarray(checkpoint.restore_model(out)[0].embed.embedding[...]),
                                  np.asarray(checkpoint.restore_model(run_dir)[0].embed.embedding[...]))


def test_a_complete_gs_export_can_be_read_at_every_moment(gcs, run_dir, monkeypatch):  # noqa: F811
    """The replacement stops (a crash) right after the marker sends readers to the new export's sibling: readers
    load the complete new export from there; the next export finishes the replacement and removes the sibling."""
    from eval import loading
    from trainer import checkpoint, export

    def embedding(path) -> np.ndarray:
        model = checkpoint.restore_model(path)[0] if path == run_dir else loading.load_model(path)[0]
        return np.asarray(model.embed.embedding[...])

    out = f"{URL}/moment/hf"
    assert orbax_to_hf(run_dir, out) == 0                                         # bfloat16: rounded weights
    assert not np.array_equal(embedding(out), embedding(run_dir))
    copy = storage.copy_file

    def crash_at_the_first_copy_in(src, dst):
        if str(dst).startswith(out + "/"):
            raise KeyboardInterrupt
        copy(src, dst)

    monkeypatch.setattr(export.storage, "copy_file", crash_at_the_first_copy_in)
    assert orbax_to_hf(run_dir, out, "--overwrite", "--dtype", "float32") == 130  # interrupted
    monkeypatch.setattr(export.storage, "copy_file", copy)
    sibling = export.readable(out)
    assert str(sibling) != out and storage.Path(sibling).name.startswith(".hf.writing-")
    assert loading.load_model(out)[2] == sibling
    np.testing.assert_array_equal(embedding(out), embedding(run_dir))            # the complete float32 export
    assert orbax_to_hf(run_dir, out, "--overwrite", "--dtype", "float32") == 0
    assert export.readable(out) == storage.Path(out) and not storage.list_files(sibling)
    np.testing.assert_array_equal(embedding(out), embedding(run_dir))
    assert [name for name in storage.list_files(f"{URL}/moment") if not name.startswith("hf/")] == []
