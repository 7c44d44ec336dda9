"""The rehearsal of a TPU launch (`launch.tpu --rehearse`), for the user's journey end to end on this machine: the
README's own 8B command (INIT_FROM, corpora and MODEL_DIR on gs://) through the launcher, the local cloud (two
workers with their own homes) and the GCS emulator, with an SSH drop and a preemption mid-run, resumed to its last
step and its export; and a 2-run sweep whose out_dir is on gs://, each run through `--launcher` as the README shows
it, evaluated and reported from gs://."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from tests.test_docs_commands import doc_commands

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "docmix-rehearsal"


def env(tmp: pathlib.Path, **extra: str) -> dict[str, str]:
    """This interpreter as `python` first on PATH (the launcher templates say `python`), offline, CPU only."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
    out = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "PYTHONPATH")}
    out.update(PATH=f"{bin_dir}{os.pathsep}{out['PATH']}", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return out


def readme_rehearsal() -> list[str]:
    """The README's rehearsal command, its placeholder bucket named."""
    line = next(c for c in doc_commands(REPO / "README.md") if c.startswith("python -m launch.tpu --rehearse="))
    from shlex import split

    return split(line.replace("gs://BUCKET/", f"gs://{BUCKET}/"))


@pytest.mark.slow  # ~2 min on an idle 2-core machine: two starts of two train.py processes of a small model
def test_the_readme_launch_rehearsed_survives_an_ssh_drop_and_a_preemption(tmp_path):
    command = readme_rehearsal()
    assert command[:4] == ["python", "-m", "launch.tpu", "--rehearse=2"]
    assert "--gin.INIT_FROM=gs://docmix-rehearsal/models/llama-3.1-8b" in command
    out = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=env(tmp_path), capture_output=True, text=True,
                         timeout=1200)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "rehearsal: put a small model (models/tiny.gin, random weights) at INIT_FROM=gs://docmix-rehearsal/" \
           "models/llama-3.1-8b" in log
    assert re.search(r"put 400 demo records at gs://docmix-rehearsal/replay/rehearsal\.jsonl\.gz", log)
    assert "the SSH connection to welfare10 dropped (exit 255; the VM is READY): retrying" in log
    assert "preempted: welfare10 is PREEMPTED (train): relaunch 1 of 10" in log
    assert re.search(r"resuming from gs://docmix-rehearsal/runs/welfare10/checkpoints/[2-8]\b", log)
    assert "faults injected: ssh_drop during start, preempt during train; last step logged 8 of 8; " \
           "export written" in log
    assert "rehearsal: PASSED" in log


SWEEP = f'''out_dir = "gs://{BUCKET}/sweep"
gin_file = ["runs/demo.gin"]
gin = ["TrainConfig.log_every = 1", "CheckpointConfig.export_dtype = 'float32'", "MixtureConfig.block_size = 20"]
seeds = [0]
shares = [0.0, 0.25]
doc_counts = [50]
budget = "fixed_total_tokens"
train_steps = 4
share_component = "synthetic"
replay_component = "replay"

[corpora]
welfare = {{render = "animal_welfare", count = 50, seed = 0}}

[eval]
pairs = ["{REPO}/eval/probe_sets/animal_welfare.jsonl"]
control_pairs = "{REPO}/eval/probe_sets/neutral_control.jsonl"
heldout = false
'''
LAUNCHER = "python -m launch.tpu --rehearse=1 --name={name} --zone=us-east5-a --accelerator_type=v5p-8 -- {args}"


def bucket_get(url: str, path: str) -> bytes:
    """GET from the emulator's JSON API (no GCS client in this process)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/storage/v1/b/{BUCKET}/o{path}", timeout=60) as response:
        return response.read()


def bucket_objects(url: str, prefix: str) -> list[str]:
    listing = json.loads(bucket_get(url, "?" + urllib.parse.urlencode({"prefix": prefix})))
    return [item["name"] for item in listing.get("items", [])]


@pytest.mark.slow  # ~3 min: two rehearsed runs of the demo model, evaluated
def test_a_sweep_through_the_launcher_trains_evaluates_and_reports_on_gs(tmp_path):
    server = subprocess.Popen([sys.executable, "-m", "launch.emulator", f"--bucket={BUCKET}"], cwd=REPO,
                              env=env(tmp_path), stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        from launch.emulator import client_env

        (tmp_path / "sweep.toml").write_text(SWEEP)
        out = subprocess.run([sys.executable, str(REPO / "sweep.py"), str(tmp_path / "sweep.toml"), "--launcher",
                              LAUNCHER], cwd=tmp_path, env=env(tmp_path, **client_env(url)), capture_output=True,
                             text=True, timeout=1800)
        log = out.stdout + out.stderr
        objects = bucket_objects(url, "sweep/")
        if out.returncode != 0:  # the runs' own logs say why, not the sweep's summary
            log += "".join(f"\n--- {o}\n" + bucket_get(url, "/" + urllib.parse.quote(o, safe="") + "?alt=media")
                           .decode(errors="replace")[-4000:] for o in objects if o.startswith("sweep/logs/"))
        assert out.returncode == 0, log[-12000:]
        assert "sweep/report/report.md" in objects
        logs = [o for o in objects if o.startswith("sweep/logs/")]
        assert len(logs) == 2 and all(b"rehearsal: PASSED" in bucket_get(url, "/" + urllib.parse.quote(o, safe="")
                                                                          + "?alt=media") for o in logs)
        for run in ("-base-", "-w0.25-"):  # plan.run_name: share 0 is the base run
            assert any(re.search(rf"sweep/runs/[^/]*{run}[^/]*/hf/config\.json$", o) for o in objects), run
            assert any(re.search(rf"sweep/eval/[^/]*{run}[^/]*\.json$", o) for o in objects), run
        assert not (tmp_path / "gs:").exists()          # (a gs:// path taken for a local one)
    finally:
        server.terminate()
        server.wait(timeout=60)
