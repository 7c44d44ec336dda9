"""`python -m eval.anima_data fetch`: the ANIMA questions and dimensions from the Hub into a local copy, byte for byte;
a cached copy needs no network; no network is one line with exit 3 at once. The Hub here is a local server with the
shared ANIMA copy (tests/hub_server.py): nothing reaches the internet."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

from eval import anima_data
from tests.hub_server import serve_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"questions": "questions.jsonl", "dimensions": "dimensions.jsonl"}


def fetch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "eval.anima_data", "fetch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fetch_writes_the_hub_files_and_reuses_the_cache(anima_dir, tmp_path):
    with serve_dataset(anima_dir, anima_data.HUB_REPO, anima_data.HUB_REVISION, CONFIGS) as hub:
        env = {"HF_ENDPOINT": hub["endpoint"], "XDG_CACHE_HOME": str(tmp_path / "xdg")}
        proc = fetch(env)
        assert proc.returncode == 0, proc.stderr
        out = tmp_path / "xdg" / "docmix" / "anima"  # the default folder
        for name in CONFIGS.values():
            assert (out / name).read_bytes() == (anima_dir / name).read_bytes()
            assert str(out / name) in proc.stdout
        source = json.loads((out / "source.json").read_text())
        assert source["revision"] == anima_data.HUB_REVISION and source["repo"] == anima_data.HUB_REPO
        assert source["files"]["questions.jsonl"] == [
            f"{hub['endpoint']}/datasets/{anima_data.HUB_REPO}/resolve/{anima_data.HUB_REVISION}/questions.jsonl"]
        asked = len(hub["requests"])
        assert asked == 3  # the revision's file list, then one file per config
        again = fetch(env)
        assert again.returncode == 0 and len(hub["requests"]) == asked  # cached: no request
        # --out elsewhere; a folder holding files fetch did not write is refused, untouched.
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "questions.jsonl").write_text("my own\n")
        refused = fetch(env, "--out", str(mine))
        assert refused.returncode == 2 and (mine / "questions.jsonl").read_text() == "my own\n"
        assert refused.stderr.strip().splitlines()[-1].startswith(f"python -m eval.anima_data: error: {mine} holds")


def test_no_network_is_one_line_and_exit_3_at_once(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    proc = fetch({"HF_ENDPOINT": endpoint}, "--out", str(tmp_path / "anima"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"python -m eval.anima_data: error: cannot fetch {endpoint}/api/datasets/"
                               f"{anima_data.HUB_REPO}/revision/{anima_data.HUB_REVISION}: ")
    assert time.monotonic() - start < 60  # one request, no retries (the interpreter's start-up is most of it)
    assert not (tmp_path / "anima").exists()
