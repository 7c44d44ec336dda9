"""launch.tpu against a fake `gcloud` on PATH: the command lines (dry run), quoting into the remote shell, and the
relaunch after preemption. The fake runs the worker command with bash in a fake home whose `.venv/bin/python`
records the arguments train.py would get, so quoting is checked by a real shell, not by string comparison."""
import json
import os
import pathlib
import shlex
import stat
import sys

import pytest

from launch import tpu

NASTY = ["--gin_file=runs/midtrain.gin", "--gin.MODEL_DIR=gs://bucket/run 1",
         "--gin.MIXTURE_WEIGHTS={'replay': 0.95, \"synthetic\": 0.05}", "--gin.X=$(touch pwned); echo `id` && true",
         "--gin.Y=a'b\"c\\d"]

FAKE_GCLOUD = r'''#!PYTHON
import json, os, pathlib, subprocess, sys
state = pathlib.Path(os.environ["FAKE_STATE"])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if "create" in args:
    state.write_text("READY")
elif "describe" in args:
    if not state.exists() or not state.read_text():
        sys.exit(1)
    print(state.read_text())
elif "delete" in args:
    state.write_text("")
elif "ssh" in args:
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    if "train.py" in command:
        sys.exit(subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": os.environ["FAKE_HOME"]}).returncode)
'''

FAKE_PYTHON = r'''#!PYTHON
import json, os, pathlib, sys
runs = pathlib.Path(os.environ["FAKE_RUNS"])
seen = json.loads(runs.read_text()) if runs.exists() else []
seen.append(sys.argv[1:])
runs.write_text(json.dumps(seen))
if len(seen) <= int(os.environ["FAKE_PREEMPTIONS"]):
    pathlib.Path(os.environ["FAKE_STATE"]).write_text("PREEMPTED")   # SIGTERM: train.py saves, exits 0
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
'''


def executable(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("PYTHON", sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_cloud(tmp_path, monkeypatch):
    executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    executable(tmp_path / "home" / "docmix" / ".venv" / "bin" / "python", FAKE_PYTHON)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"FAKE_STATE": "state", "FAKE_LOG": "gcloud.log", "FAKE_HOME": "home",
                        "FAKE_RUNS": "runs.json"}.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def gcloud_calls(root):
    return [json.loads(line) for line in (root / "gcloud.log").read_text().splitlines()]


def launch(*extra):
    return tpu.main(["--name=t1", "--zone=us-east5-a", "--accelerator_type=v5p-8", "--spot", "--poll_seconds=0",
                     *extra, "--", *NASTY])


def test_preempted_run_is_relaunched_with_the_same_arguments_then_the_vm_is_deleted(fake_cloud, monkeypatch):
    monkeypatch.setenv("FAKE_PREEMPTIONS", "2")
    assert launch() == 0
    runs = json.loads((fake_cloud / "runs.json").read_text())
    assert runs == [["train.py", "--distributed", *NASTY]] * 3          # every byte arrived, three attempts
    assert not (fake_cloud / "home" / "docmix" / "pwned").exists()
    calls = gcloud_calls(fake_cloud)
    verbs = [c[3] for c in calls]
    one_attempt = ["create", "scp", "ssh", "ssh", "ssh", "describe"]
    assert verbs == one_attempt + ["delete"] + one_attempt + ["delete"] + one_attempt + ["delete"]
    creates = [c for c in calls if c[3] == "create"]
    assert all("--spot" in c and "--accelerator-type=v5p-8" in c and "--version=v2-alpha-tpuv5" in c for c in creates)
    assert all("--worker=all" in c for c in calls if c[3] in ("ssh", "scp"))
    assert (fake_cloud / "state").read_text() == ""                     # deleted at the end


def test_relaunches_are_bounded_and_a_failed_run_is_not_relaunched(fake_cloud, monkeypatch):
    monkeypatch.setenv("FAKE_PREEMPTIONS", "5")
    assert launch("--max_relaunches=1") == 3
    assert len(json.loads((fake_cloud / "runs.json").read_text())) == 2
    (fake_cloud / "runs.json").unlink()
    monkeypatch.setenv("FAKE_PREEMPTIONS", "0")
    monkeypatch.setenv("FAKE_EXIT", "1")                                 # e.g. a non-finite loss: VM still READY
    assert launch() == 1
    assert len(json.loads((fake_cloud / "runs.json").read_text())) == 1


def test_dry_run_prints_every_command_and_runs_none(fake_cloud, capsys):
    assert launch("--dry_run", "--queued") == 0
    assert not (fake_cloud / "gcloud.log").exists()
    lines = [shlex.split(line.removeprefix("(dry run) ")) for line in capsys.readouterr().out.splitlines()
             if line.startswith("(dry run) ")]
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "t1"]
    train = next(line for line in lines if any("train.py" in a for a in line))
    assert "--worker=all" in train
    remote = shlex.split(next(a for a in train if a.startswith("--command=")).removeprefix("--command="))
    assert remote[remote.index("train.py") + 1:] == ["--distributed", *NASTY]
    assert lines[-1][3:5] == ["queued-resources", "delete"]


def test_model_dir_must_be_on_gcs(fake_cloud, capsys):
    assert tpu.main(["--name=t1", "--zone=z", "--accelerator_type=v5p-8", "--", "--gin.MODEL_DIR=/local/run"]) == 2
    assert "gs://" in capsys.readouterr().err


def test_code_files_outside_a_git_checkout_are_the_tracked_files(tmp_path):
    """A tree without .git (a release tarball, a copy) ships what `git ls-files` would: .gitignore'd runs, caches,
    venvs and bytecode stay home."""
    tracked = tpu.code_files()
    assert "train.py" in tracked and "launch/tpu.py" in tracked and not any(n.startswith(".venv/") for n in tracked)
    copy = tmp_path / "docmix"
    for name in tracked:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((tpu.ROOT / name).read_bytes())
    for junk in ("runs/demo/checkpoints/2/state", ".venv/bin/python", "models/__pycache__/llama.cpython-311.pyc",
                 "sweep_runs/demo/x.json", "cache/smollm2/model.safetensors", "docmix.egg-info/PKG-INFO"):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_text("not code")
    assert sorted(tpu.code_files(copy)) == sorted(tracked)
