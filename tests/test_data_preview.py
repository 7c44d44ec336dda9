"""preview() and the `python -m trainer.preview` CLI on a small gin config."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from data.config import Component, MixtureConfig
from data.preview import format_table, preview
from tests.test_data_util import word_tokenizer, words_doc, write_gin, write_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("preview")
    return {"tok": word_tokenizer(d / "tok"),
            "a": write_jsonl(d / "a.jsonl", [words_doc(6, i) for i in range(10)]),
            "b": write_jsonl(d / "b.jsonl", [words_doc(30, i) for i in range(4)]), "dir": d}


def test_preview_counts_and_samples(files):
    comps = (Component("a", paths=(str(files["a"]),), prefix="<DOCTAG> "), Component("b", paths=(str(files["b"]),)))
    cfg = MixtureConfig(components=comps, weights={"a": 0.25, "b": 0.75}, tokenizer=str(files["tok"]), seq_len=16,
                        batch_size=4, block_size=8)
    out = preview(cfg, 4, samples=1)
    assert out["rows"] == 16 and out["padding_fraction"] == 0.0
    a = out["components"]["a"]
    assert (a["weight"], a["rows"], a["tokens"], a["token_share"]) == (0.25, 4, 64, 0.25)
    assert a["documents"] == 8 and a["epochs"] == pytest.approx(0.8)  # 8-token docs, 2 per row
    assert out["components"]["b"]["rows"] == 12
    assert out["samples"]["a"][0].startswith("[[<s> <DOCTAG>]]") and " | " in out["samples"]["a"][0]
    table = format_table(out)
    assert "token share" in table and "--- b ---" in table


def test_preview_cli_json(files, tmp_path):
    gin_file = write_gin(tmp_path / "small.gin", tokenizer=files["tok"], components={"a": files["a"], "b": files["b"]},
                         weights={"a": 0.25, "b": 0.75}, model_dir=tmp_path / "run")
    cmd = [sys.executable, "-m", "trainer.preview", f"--gin_file={gin_file}", "--num_batches", "4", "--json",
           "--gin.MIXTURE_WEIGHTS={'a': 0.5, 'b': 0.5}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"components", "padding_fraction", "rows", "stages"}
    assert [(st["start"], st["end"], st["components"]["a"]["rows"]) for st in out["stages"]] == [(0, 4, 8)]
    assert set(out["components"]["a"]) == {"weight", "token_share", "rows", "tokens", "documents", "epochs"}
    assert out["rows"] == 16 and out["components"]["a"]["rows"] == 8 and out["components"]["a"]["weight"] == 0.5
    res = subprocess.run(cmd[:-2] + ["--gin.MIXTURE_WEIGHTS={'a': 0.5, 'zz': 0.5}"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "zz" in res.stderr


def test_a_short_run_of_the_demo_at_5_percent_gets_its_rows():
    """The demo run scaled down to 20 steps of 8 rows (160 rows, less than one of its 400-row mixture blocks) at 5%:
    the run's layout ends its last block with the run, so every seed trains on exactly 8 synthetic rows (5% of 160),
    as train.py would read them (the run's gin config, TRAIN_STEPS included)."""
    from trainer import config as trainer_config

    for seed in range(3):
        run = trainer_config.load([], ["MODEL_DIR = 'unused'", "TRAIN_STEPS = 20", f"SEED = {seed}",
                                       "MIXTURE_WEIGHTS = {'replay': 0.95, 'synthetic': 0.05}"])
        assert run.mixture.block_size == 400 and run.mixture.train_steps == 20
        out = preview(run.mixture, 20)
        assert (out["rows"], out["components"]["synthetic"]["rows"]) == (160, 8), seed


def _stderr(cmd: list[str], terminal: bool) -> str:
    """stderr of `cmd` run with stderr on a pseudo-terminal (as in an interactive shell) or on a pipe (as in CI)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    if not terminal:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_and_quiet_otherwise():
    cmd = [sys.executable, "-m", "trainer.preview", "--num_batches", "3", "--samples", "0"]
    shown = _stderr(cmd, terminal=True)
    assert "data.preview: opening the corpora" in shown and "3/3" in shown
    quiet = _stderr(cmd, terminal=False)
    assert "opening the corpora" not in quiet and "3/3" not in quiet
