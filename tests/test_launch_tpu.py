"""launch.tpu against a cloud that misbehaves (launch.local_cloud): TPU VMs with states, `ssh --worker=all` running the
command with bash in each worker's own home, and injected faults: an SSH drop while the job keeps running, and a
preemption during create, setup, sync and training. The code copied to the workers is launch/, storage/ and
exit_codes.py with a stand-in train.py that counts steps in MODEL_DIR (here a local folder standing for the bucket),
saves and exits 0 on SIGTERM, and records the arguments it got, so that quoting is checked by a real shell."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import repo
from launch import cloud, launcher, local_cloud, remote
from launch.launcher import Launcher, Options

REPO = pathlib.Path(__file__).resolve().parents[1]
NASTY = ["--gin_file=runs/midtrain.gin", "--gin.MODEL_DIR=gs://bucket/run 1",
         "--gin.MIXTURE_WEIGHTS={'replay': 0.95, \"synthetic\": 0.05}", "--gin.X=$(touch pwned); echo `id` && true",
         "--gin.Y=a'b\"c\\d"]
STEPS = 6

FAKE_TRAIN = r'''"""train.py's stand-in: process 0 counts steps in MODEL_DIR/progress.json; SIGTERM saves, exits 0."""
import json, os, signal, sys, time
import storage

model_dir = storage.Path(os.environ["FAKE_MODEL_DIR"])
rank = int(os.environ.get("DOCMIX_PROCESS_ID", "0"))
argv_log = model_dir / f"argv-{rank}.jsonl"
argv_log.write_text((argv_log.read_text() if argv_log.exists() else "") + json.dumps(sys.argv[1:]) + "\n")
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
progress = model_dir / "progress.json"
step = json.loads(progress.read_text())["step"] if progress.exists() else 0
if step and rank == 0:
    print(f"00:00:00 INFO trainer.run_setup: resuming from {model_dir}/checkpoints/{step}", flush=True)
while step < int(os.environ["FAKE_STEPS"]) and not stop:
    time.sleep(0.2)
    step += 1
    if rank == 0:
        progress.write_text(json.dumps({"step": step}))
        print(f"step {step} loss {1 / step:.4f}", flush=True)
    if str(step) == os.environ.get("FAKE_HOLD_AT") and not (model_dir / f"held-{rank}").exists():
        (model_dir / f"held-{rank}").write_text("")  # once: wait here for the preemption (SIGTERM), however slow
        deadline = time.time() + 600
        while not stop and time.time() < deadline:
            time.sleep(0.1)
    if os.environ.get("FAKE_DIE") and rank == 0 and step == 2 and not (model_dir / "died").exists():
        (model_dir / "died").write_text("")
        os.killpg(0, 9)  # the job and train.py vanish without a word, as under the kernel's OOM killer
print(f"fake train.py: done at step {step}", flush=True)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
'''


class Cloud:
    """A local cloud in `root`, a fake code archive, a MODEL_DIR folder standing for the bucket."""

    def __init__(self, tmp: pathlib.Path, faults=(), workers=2, env=None):
        self.root, self.model_dir = tmp / "cloud", tmp / "bucket" / "run"
        self.root.mkdir(parents=True)
        self.model_dir.mkdir(parents=True)
        code = tmp / "code"
        for name in ("launch", "storage"):
            shutil.copytree(REPO / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("exit_codes.py", "platforms.py", "repo.py", "requirements.txt", *remote.REQUIREMENTS):
            shutil.copyfile(REPO / name, code / name)
        (code / "train.py").write_text(FAKE_TRAIN)
        self.archive = remote.code_archive(tmp / remote.ARCHIVE, code)
        (self.root / "cloud.json").write_text(json.dumps({
            "workers": workers, "devices": 1, "faults": list(faults),
            "env": {"FAKE_MODEL_DIR": str(self.model_dir), "FAKE_STEPS": str(STEPS), **(env or {})}}))
        local_cloud.make_bin(self.root)
        self.gcloud = cloud.Gcloud(program=[sys.executable, "-m", "launch.local_cloud", f"--root={self.root}"],
                                   env={**os.environ, "PYTHONPATH": str(REPO)}, out=self.say)
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def launcher(self, s: cloud.Slice, **options) -> Launcher:
        o = Options(**{"poll_s": 0.2, "heartbeat_s": 0.2, "stale_s": 60.0, "stop_grace_s": 30.0, **options})
        return Launcher(s, self.gcloud, str(self.model_dir), NASTY, self.archive, o, self.say)

    def node(self, name: str) -> dict:
        return json.loads((self.root / "nodes" / f"{name}.json").read_text())

    def argv(self, rank: int = 0) -> list[list[str]]:
        path = self.model_dir / f"argv-{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def step(self) -> int:
        path = self.model_dir / "progress.json"
        return json.loads(path.read_text())["step"] if path.exists() else 0


SLICE = cloud.Slice("t1", "us-east5-a", "v5p-8", "v2-alpha-tpuv5", spot=True)


@pytest.fixture(autouse=True)
def no_job_outlives_the_test(tmp_path):
    yield
    for root in tmp_path.rglob("cloud.json"):
        local_cloud.LocalCloud(root.parent).delete_all()


def test_preemption_in_every_phase_is_relaunched_and_the_run_resumes_to_the_end(tmp_path):
    """Preempted while created, synced, set up and training, an SSH drop when the job starts (it runs on), and
    gcloud failing for a while during training (not a preemption): five attempts, the job ends at the last step,
    the arguments intact on both workers, the VM deleted."""
    faults = [{"kind": "preempt", "phase": p} for p in ("create", "setup", "sync")] + [
        {"kind": "ssh_drop", "phase": "start"}, {"kind": "preempt", "phase": "train", "step": 3}] + [
        {"kind": "describe_error", "phase": "train", "step": 1}] * 7   # gcloud unreachable for a while: no relaunch
    c = Cloud(tmp_path, faults, env={"FAKE_HOLD_AT": "3"})
    assert c.launcher(SLICE).run() == 0
    assert c.step() == STEPS
    said = "\n".join(c.lines)
    for phase in ("create", "setup", "sync", "train"):
        assert f"({phase}): relaunch" in said, phase
    assert "the SSH connection to t1 dropped (exit 255; the VM is READY): retrying" in said
    assert "gcloud cannot describe the slice (no network here?); following the job in MODEL_DIR" in said
    assert said.count(": relaunch ") == 4
    assert "step 6 loss" in said                                                   # the job's log, streamed
    for rank in (0, 1):
        runs = c.argv(rank)
        assert len(runs) == 2, runs                        # one start before the preemption in training, one after
        assert all(r[0] == "--distributed" and r[-len(NASTY):] == NASTY for r in runs)
    assert not list(c.root.rglob("pwned"))
    assert c.node("t1")["state"] == "DELETED"
    states = json.loads((c.model_dir / "launch" / "t1-w0.json").read_text())
    assert states["state"] == "finished" and states["exit_code"] == 0 and states["step"] == STEPS


def test_a_run_preempted_at_its_last_step_resumes_there_and_is_reported_at_it(tmp_path):
    """Preempted after its last step was saved: the relaunched train.py resumes at that step and logs no step; the
    job's state and the launcher's last line give the step it resumed at."""
    c = Cloud(tmp_path, [{"kind": "preempt", "phase": "train", "step": STEPS}], env={"FAKE_HOLD_AT": str(STEPS)})
    assert c.launcher(SLICE).run() == 0
    said = "\n".join(c.lines)
    assert "(train): relaunch 1 of" in said
    assert f"finished at step {STEPS}: exit status 0" in said
    assert json.loads((c.model_dir / "launch" / "t1-w0.json").read_text())["step"] == STEPS


def test_a_launcher_that_loses_the_network_keeps_the_vm_of_a_live_job_and_reattaches(tmp_path):
    """Every SSH connection that starts the job drops (the job runs): the launcher gives up (exit 3) but keeps the
    VM; run again, it finds the job alive, follows it to its end and only then deletes the VM."""
    c = Cloud(tmp_path, [{"kind": "ssh_drop", "phase": "start"}] * 3, env={"FAKE_STEPS": "25"})
    first = c.launcher(SLICE, ssh_retries=2)
    with pytest.raises(launcher.CloudFailure, match="start: SSH to t1 failed 3 times"):
        first.run()
    assert c.node("t1")["state"] == "READY" and "the VM is kept" in "\n".join(c.lines)
    c.lines.clear()
    assert c.launcher(SLICE).run() == 0
    said = "\n".join(c.lines)
    assert "reattached" in said and "create" not in said and c.step() == 25
    assert len(c.argv(0)) == 1 and c.node("t1")["state"] == "DELETED"   # started once, by the first launcher


def test_a_job_that_vanishes_is_relaunched_and_a_failed_run_is_not(tmp_path):
    """A job killed outright (no final state; its heartbeat stops) is stopped and started again on the same VM;
    a run that fails (exit 1, VM READY) ends the launch with its exit status and its output, not relaunched."""
    c = Cloud(tmp_path, env={"FAKE_DIE": "1"})
    assert c.launcher(SLICE, stale_s=10.0).run() == 0
    said = "\n".join(c.lines)
    assert "no heartbeat from t1-w0 for 10 s" in said and c.step() == STEPS and len(c.argv(0)) == 2
    assert said.count("gcloud compute tpus tpu-vm create") == 1                   # the same VM, set up once

    c = Cloud(tmp_path / "failed", env={"FAKE_EXIT": "1"})
    assert c.launcher(SLICE).run() == 1
    said = "\n".join(c.lines)
    assert "train.py on t1-w0 exited with status 1 (its output is above)" in said
    assert "train.py on t1-w1 exited with status 1; its output:\nfake train.py: done at step 6" in said
    assert len(c.argv(0)) == 1 and c.node("t1")["state"] == "DELETED"


def test_relaunches_are_bounded(tmp_path):
    c = Cloud(tmp_path, [{"kind": "preempt", "phase": p} for p in ("create", "setup", "sync")])
    with pytest.raises(launcher.CloudFailure, match="no relaunches left"):
        c.launcher(SLICE, max_relaunches=2).run()
    assert c.node("t1")["state"] in ("DELETED", "PREEMPTED") and not c.argv(0)


def test_two_slices_are_one_queued_resource_and_a_preempted_slice_relaunches_both(tmp_path):
    c = Cloud(tmp_path, [{"kind": "preempt", "phase": "train", "step": 2}], env={"FAKE_HOLD_AT": "2"})
    two = cloud.Slice("t2", "us-east5-a", "v5p-8", "v2-alpha-tpuv5", spot=True, num_slices=2)
    assert c.launcher(two).run() == 0 and c.step() == STEPS
    said = "\n".join(c.lines)
    assert "queued-resources create t2 --node-count=2 --node-prefix=t2" in said
    assert "started job" in said and "on 4 worker(s)" in said
    assert all(len(c.argv(rank)) == 2 for rank in range(4))   # processes 0-3 over both slices, twice
    assert not (c.root / "queued" / "t2.json").exists()          # deleted at the end


def run_main(*args, path_dir=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if path_dir is not None:
        env["PATH"] = f"{path_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "launch.tpu", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_runs_nothing_and_says_so(tmp_path):
    """No gcloud call at all (a gcloud on PATH records any), every command printed, the AOT check included; MODEL_DIR
    as sweep.py's plan binds it, and a sweep's run name as --name (not a valid VM name as it is)."""
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(f"#!/bin/sh\ntouch {tmp_path / 'called'}\n")
    gcloud.chmod(0o755)
    out = run_main("--name=model-welfare-n50-w0.25-s0", "--zone=z", "--accelerator_type=v6e-8", "--queued",
                   "--dry_run", "--", "--gin_file=runs/midtrain.gin", "--gin_bindings=MODEL_DIR = 'gs://b/sweep/r1'",
                   "--gin.INIT_FROM=gs://b/models/llama", path_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].endswith("the TPU VM is named model-welfare-n50-w0-25-s0 (lower case letters, digits and -)")
    assert lines[1].startswith("(dry run, not run) python -m launch.aot --topology=v6e:2x4 ")
    assert lines[2].startswith("(dry run, not run) gcloud compute tpus queued-resources create "
                               "model-welfare-n50-w0-25-s0 ")
    assert lines[-1] == "launch.tpu: dry run: nothing was created and nothing ran"
    assert "finished" not in out.stdout and not (tmp_path / "called").exists()
    start = next(line for line in lines if "launch.job" in line)
    assert "--model_dir=gs://b/sweep/r1" in start    # MODEL_DIR as sweep.py's plan binds it (--gin_bindings)


@pytest.mark.parametrize("args, message", [
    (["--gin.MODEL_DIR=/local/run"], "MODEL_DIR=/local/run: must be on gs://"),
    (["--gin_file=runs/midtrain.gin", "--gin.MODEL_DIR=gs://b/r", "--gin.INIT_FROM=/mnt/disks/llama"],
     "INIT_FROM=/mnt/disks/llama: must be on gs://"),
    (["--gin.MODEL_DIR=gs://b/r", "--no_such_flag"], "train.py arguments: unrecognized --no_such_flag"),
])
def test_a_launch_that_cannot_work_is_refused_before_anything_runs(args, message):
    out = run_main("--name=t1", "--zone=z", "--accelerator_type=v5p-8", "--", *args)
    assert out.returncode == 2 and out.stderr.strip().startswith(f"python -m launch.tpu: error: {message}")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_code_files_outside_a_git_checkout_are_the_tracked_files(tmp_path):
    """A tree without .git (a release tarball, a copy) ships what `git ls-files` would: .gitignore'd runs, caches,
    venvs and bytecode stay home."""
    tracked = remote.code_files()
    assert "train.py" in tracked and "launch/tpu.py" in tracked and not any(n.startswith(".venv/") for n in tracked)
    copy = tmp_path / "docmix"
    for name in tracked:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((repo.ROOT / name).read_bytes())
    for junk in ("runs/demo/checkpoints/2/state", ".venv/bin/python", "models/__pycache__/llama.cpython-311.pyc",
                 "sweep_runs/demo/x.json", "cache/smollm2/model.safetensors", "docmix.egg-info/PKG-INFO"):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_text("not code")
    assert sorted(remote.code_files(copy)) == sorted(tracked)
