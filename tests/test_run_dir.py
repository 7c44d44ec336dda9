"""MODEL_DIR must be a docmix run directory, a new folder or an empty one: someone else's folder is refused before
anything is written (exit 2, one line naming the folder and a few of its files), and a run directory resumes (also
one written before the marker existed); a run that diverged keeps its metrics apart for the rerun."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from trainer import run_dir

REPO = pathlib.Path(__file__).resolve().parents[1]


def tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_someone_elses_folder_is_refused_by_train_py_before_anything_is_written(tmp_path):
    """The folder holds a config.gin and a metrics.jsonl of its own: docmix did not write them."""
    theirs = tmp_path / "their_experiment"
    theirs.mkdir()
    (theirs / "config.gin").write_text("learning_rate = 0.1\n")
    (theirs / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
    (theirs / "notes").mkdir()
    (theirs / "notes" / "todo.txt").write_text("keep me\n")
    before = tree(theirs)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--gin_file=runs/demo.gin",
                           "--gin_file=models/tiny.gin", "--gin.TRAIN_STEPS=2", f"--gin.MODEL_DIR={theirs}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"train.py: error: MODEL_DIR={theirs} holds files docmix did not write (config.gin, metrics.jsonl, notes): it "
        f"is not a docmix run directory (no {run_dir.MARKER}), so nothing was written into it. Choose a new or empty "
        "folder for MODEL_DIR, or the run directory of the docmix run to resume")
    assert tree(theirs) == before and sorted(p.name for p in theirs.iterdir()) == ["config.gin", "metrics.jsonl",
                                                                                    "notes"]


def test_what_check_accepts(tmp_path):
    run_dir.check(str(tmp_path / "new"))                      # not there yet
    (tmp_path / "empty").mkdir()
    run_dir.check(str(tmp_path / "empty"))
    killed = tmp_path / "killed_at_start"                     # what a start-up killed before the marker leaves
    killed.mkdir()
    (killed / "writer.lock").write_text("{}")
    (killed / "writer.lock.123.456.tmp").write_text("{}")
    (killed / ".docmix_shared_check.0123abcd").write_text("x")
    (killed / "launch" / "logs").mkdir(parents=True)             # launch.job's state, written as train.py starts
    (killed / "launch" / "tpu-w0.json").write_text("{}")
    run_dir.check(str(killed))
    ours = tmp_path / "ours"                                  # a run directory with the user's own files added
    run_dir.claim(str(ours))
    (ours / "my_notes.md").write_text("lr sweep, arm 3\n")
    run_dir.check(str(ours))
    assert json.loads((ours / run_dir.MARKER).read_text())["format"] == "docmix run directory"
    older = tmp_path / "older"                                # a run directory written before the marker existed
    (older / "checkpoints" / "8" / "metadata").mkdir(parents=True)
    (older / "checkpoints" / "8" / "metadata" / "metadata").write_text(json.dumps({"model_config": {}, "step": 8}))
    (older / "config.gin").write_text("")
    run_dir.check(str(older))


@pytest.mark.parametrize("names, shown", [
    (["config.gin", "metrics.jsonl"], "(config.gin, metrics.jsonl)"),
    ([f"f{i}" for i in range(8)], "(f0, f1, f2, f3, f4 and 3 more)"),
    (["checkpoints"], "(checkpoints)"),                     # another trainer's checkpoints, no docmix metadata
])
def test_what_check_refuses(tmp_path, names, shown):
    folder = tmp_path / "theirs"
    folder.mkdir()
    for name in names:
        (folder / name).mkdir() if name == "checkpoints" else (folder / name).write_text("x")
    (folder / "writer.lock").write_text("{}")  # start-up leftovers are not named
    with pytest.raises(run_dir.ForeignModelDir, match=re.escape(f"holds files docmix did not write {shown}")):
        run_dir.check(str(folder))
    with pytest.raises(run_dir.ForeignModelDir):
        run_dir.claim(str(folder))
    assert not (folder / run_dir.MARKER).exists()


def test_set_aside_metrics_keeps_every_diverged_attempt(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 2.5}\n')
    first = run_dir.set_aside_metrics(tmp_path, 3, "step 3: non-finite loss")
    second = run_dir.set_aside_metrics(tmp_path, 3, "step 3: non-finite gradient norm")
    assert (first.name, second.name) == ("3", "3-2")
    for folder, reason in ((first, "loss"), (second, "gradient norm")):
        assert (folder / "metrics.jsonl").read_text() == (tmp_path / "metrics.jsonl").read_text()
        assert (folder / "reason.txt").read_text() == f"step 3: non-finite {reason}\n"
    assert run_dir.set_aside_metrics(tmp_path / "none", 1, "x") is None


def test_set_aside_metrics_keeps_the_parts_not_yet_composed_and_the_probes(tmp_path):
    """On gs:// records may still be in metrics.jsonl.parts/ (trainer.metrics_file): the copy reads the same."""
    from trainer import metrics_file

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    metrics_file.parts_dir(tmp_path / "metrics.jsonl").mkdir()
    (metrics_file.parts_dir(tmp_path / "metrics.jsonl") / "0.jsonl").write_text('{"step": 2, "loss": 2.5}\n')
    (tmp_path / "probes.jsonl").write_text('{"step": 0, "welfare": [0.5]}\n')  # in-loop probes' margins, too
    kept = run_dir.set_aside_metrics(tmp_path, 3, "step 3: non-finite loss")
    assert metrics_file.read(kept / "metrics.jsonl") == metrics_file.read(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 2.5}]
    assert (kept / "probes.jsonl").read_text() == (tmp_path / "probes.jsonl").read_text()
