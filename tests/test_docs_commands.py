"""Every command in README.md and docs/*.md runs as written, scaled down, in a fresh checkout-like directory.

Which commands: every line of every ```bash block (continuation lines joined, comments dropped), read in the order
README.md, then docs/*.md alphabetically, all run one after another in ONE working directory, like a new user
following the docs (the README's demo run and corpora are there for the docs' examples). ```text blocks are synopses
(placeholders, [optional] flags) and are not run; a runnable example follows each. A new command in a ```bash block
is covered automatically and must work as written.

The directory is a copy of the repository's files (`git ls-files`, as a clone would have them) beside a link to
`../shared` (the local ANIMA copy the docs point at); `python`, `python3`, `python3.11` and `.venv/bin/python` run
this interpreter (CI has installed the requirements already, see .ci/run).

Scaled down (`scale`): --count 12, --num_batches 2, --epochs 1, train.py with TRAIN_STEPS=2, BATCH_SIZE=8,
SEQ_LEN=64, 2 held-out batches and one microbatch; bench scripts with one seed and 2 steps. Inputs the docs say the
user brings are made first (`user_files`): a gzipped replay corpus at replay/ and bucket/replay/, synthetic documents at
bucket/synth/, and alpaca.jsonl.

The allow-list (`EXTERNAL`) is every command that needs something a CI machine does not have, each with its
scaled-down substitute: installing from PyPI (CI did), a hosted LLM (a local OpenAI-compatible server that answers in
the expected format), real 8B weights (the demo run's export), a TPU slice and a bucket (one local process, local
files), a hosted grader (SmolLM2-135M through Inspect's hf provider) and the lent GPU's 300-step runs (`--help`).
One entry is the documented demo experiments (sweep and durability), which their own tests run from the
documented files (`COVERED_BY`, checked below). A command that matches no entry runs unchanged apart from `scale`.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.synth_servers import FlakyApp, serve

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)


def doc_commands(path: pathlib.Path) -> list[str]:
    """The commands of a markdown file's ```bash blocks, one per line after joining `\\` continuations."""
    commands = []
    for match in FENCE.finditer(path.read_text()):
        if match.group(2) != "bash":
            continue
        for line in match.group(3).replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())  # trailing comments (none of the commands quote a '#')
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


# (pattern, why it cannot run on CI, substitute). Substitutes are applied in order to a command matching `pattern`.
Substitute = Callable[[str, dict], str]
EIGHT_B = r"/models/Llama-3\.1-8B-Instruct|/mnt/disks/llama-3\.1-8b|gs://BUCKET/models/llama-3\.1-8b"
EXTERNAL: list[tuple[str, str, Substitute]] = [
    (r"^python3\.11 -m venv \.venv && .*pip install -r requirements\.txt && \.venv/bin/python train\.py$",
     "installs from PyPI (CI has: .ci/run)", lambda c, ctx: ".venv/bin/python train.py"),
    (r"^python3\.11 -m venv \.venv && .*pytest -n 2 tests$", "installs from PyPI and is the whole suite (pytest, "
     "with xdist for -n, collects this file)",
     lambda c, ctx: ".venv/bin/python -m pytest -q -n 0 -p no:cacheprovider --collect-only "
                    "tests/test_docs_commands.py"),
    (r"^pip install -r requirements-\w+\.txt$", "installs from PyPI (CI has: .ci/run; --no-index checks the file is "
     "satisfied by what is installed)", lambda c, ctx: c.replace("pip install", "python -m pip install --no-index", 1)),
    (r"^export OPENAI_API_KEY=", "a real API key", lambda c, ctx: "export OPENAI_API_KEY=test-key"),
    (r"^vllm serve ", "a GPU LLM server (the local test server stands in)", lambda c, ctx: "true"),
    (r"data\.synth generate ", "a hosted or GPU LLM (the local test server answers instead)",
     lambda c, ctx: re.sub(r"--base-url \S+", f"--base-url {ctx['llm_url']}", c)),
    (r"^python -m launch\.tpu --rehearse=", "run as documented by tests/test_rehearsal.py, which reads it from "
     "README.md (two minutes)", lambda c, ctx: "true"),
    (rf"^(?!python -m launch\.tpu ).*({EIGHT_B})", "real 8B weights (the demo run's export instead; launch.tpu's "
     "dry run keeps them: it reads nothing)", lambda c, ctx: re.sub(EIGHT_B, "runs/demo/hf", c)),
    (r"^(?!python -m launch\.tpu ).*gs://BUCKET/", "a Cloud Storage bucket (a local folder instead; launch.tpu's dry "
     "run keeps gs://, which it requires and never touches)", lambda c, ctx: c.replace("gs://BUCKET/", "bucket/")),
    (r"train\.py --distributed", "a multi-host TPU slice (one local process instead)",
     lambda c, ctx: c.replace(" --distributed", "")),
    (r"eval\.anima .*--grader (google|openai)/", "a hosted grader (SmolLM2-135M through Inspect's hf provider)",
     lambda c, ctx: re.sub(r"--grader \S+", f"--grader hf/{ctx['grader']}", c)
     + " --dataset_dir ../shared/data/anima --limit 1 --max_tokens 8 --grader_max_tokens 8"),
    (r"launch\.aot .*models/llama3_1_8b\.gin", "an 8B compile takes minutes and GBs of RAM (the tiny model instead)",
     lambda c, ctx: c.replace("models/llama3_1_8b.gin", "models/tiny.gin") + " --gin.BATCH_SIZE=16 --gin.SEQ_LEN=128"),
    (r"launch\.aot .*--gin\.INIT_FROM=runs/demo/hf", "an 8B compile takes minutes and GBs of RAM (the demo run's "
     "export as INIT_FROM, a small batch)", lambda c, ctx: c + " --gin.BATCH_SIZE=16 --gin.SEQ_LEN=128"),
    (r"^python sweep\.py sweeps/smollm2(_cpu)?\.toml", "hours of SmolLM2 training on a CPU; its INIT_FROM is the test "
     "cache's SmolLM2 folder, not the checkout's (--help)", lambda c, ctx: "python sweep.py --help"),
    (r"experiments\.durability sweeps/durability_smollm2(_cpu)?\.toml", "hours of SmolLM2 training on a CPU (--help)",
     lambda c, ctx: "python -m experiments.durability --help"),
    (r"^(python -m experiments\.durability sweeps/durability_demo|python sweep\.py sweeps/demo)\.toml$",
     "run as documented, scaled alike, by the test that checks its report (COVERED_BY)", lambda c, ctx: "true"),
    (r"bench/demo_device\.py |bench/demo_experiment\.py analyze ",
     "the lent GPU's 300-step runs (the script loads and parses its flags: --help)",
     lambda c, ctx: c.split(" ", 2)[0] + " " + c.split(" ", 2)[1] + (" analyze" if " analyze " in c else "") + " --help"),
]
SCALE = [(r"--count \d+", "--count 12"), (r"--num_batches \d+", "--num_batches 2"), (r"--epochs \d+", "--epochs 1"),
         (r"--seeds( \d+)+", "--seeds 0"), (r"--steps \d+", "--steps 2")]
# One microbatch: runs/midtrain.gin's 2 (for its 64 rows) would leave 4 rows for the 8 fake devices.
TRAIN_SCALE = (" --gin.TRAIN_STEPS=2 --gin.BATCH_SIZE=8 --gin.SEQ_LEN=64 --gin.CHECKPOINT_EVERY=2"
               " --gin.TrainConfig.eval_batches=2 --gin.TrainConfig.microbatches=1")
# Documented experiment files whose runs are checked, scaled like train.py's runs, by their own tests (running them
# here as well cost ~5 min of the suite).
COVERED_BY = {"sweeps/durability_demo.toml": "tests/test_durability.py", "sweeps/demo.toml": "tests/test_sweep.py"}


def scale(command: str) -> str:
    for pattern, small in SCALE:
        command = re.sub(pattern, small, command)
    if re.search(r"(^|/)(python|python3\.11) train\.py\b", command.split(" && ")[-1]):
        command += TRAIN_SCALE
    return command


def substitute(command: str, ctx: dict) -> tuple[str, list[str]]:
    """(the command to run, why each substitute applied)."""
    reasons = []
    for pattern, why, sub in EXTERNAL:
        if re.search(pattern, command):
            command = sub(command, ctx)
            reasons.append(why)
    return scale(command), reasons


def user_files(root: pathlib.Path) -> None:
    """What the docs tell the user to bring: a replay corpus (JSONL.gz), synthetic documents in a bucket and
    Alpaca-format SFT data."""
    from trainer.demo_assets import demo_asset

    (root / "bucket" / "synth").mkdir(parents=True)
    shutil.copyfile(demo_asset("welfare"), root / "bucket" / "synth" / "welfare.jsonl")

    lines = pathlib.Path(demo_asset("replay")).read_text().splitlines()[:200]
    for folder in (root / "replay", root / "bucket" / "replay"):
        folder.mkdir(parents=True)
        for i in range(2):
            with gzip.open(folder / f"part{i}.jsonl.gz", "wt") as f:
                f.write("\n".join(lines[i::2]) + "\n")
    (root / "alpaca.jsonl").write_text("".join(
        json.dumps({"instruction": f"Add {a} and {a + 3}.", "input": "", "output": f"{2 * a + 3}"}) + "\n"
        for a in range(40)))


def checkout(tmp: pathlib.Path) -> pathlib.Path:
    """A copy of the repository's files as a fresh clone has them, beside ../shared, with `python` on PATH."""
    root = tmp / "docmix"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    if (REPO.parent / "shared").is_dir():
        (tmp / "shared").symlink_to(REPO.parent / "shared")
    for folder in (tmp / "bin", root / ".venv" / "bin"):
        folder.mkdir(parents=True)
        for name in ("python", "python3", "python3.11"):
            (folder / name).write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
            (folder / name).chmod(0o755)
    return root


def env(tmp: pathlib.Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "OPENAI"))}
    out.update(PATH=f"{tmp / 'bin'}:{out.get('PATH', '/usr/bin:/bin')}", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", INSPECT_LOG_DIR=str(tmp / "inspect_logs"),
               DOCMIX_CACHE=os.environ.get("DOCMIX_CACHE", str(REPO / "cache")))
    return out


def test_every_doc_command_is_found():
    """The extraction itself: continuations joined, comments dropped, text blocks skipped, indented fences read."""
    readme = doc_commands(REPO / "README.md")
    assert any(c.startswith("python -m data.preview --gin_file=runs/midtrain.gin ") and c.endswith("--num_batches 50")
               for c in readme)
    training = doc_commands(REPO / "docs" / "training.md")
    assert any(c.startswith("python -m models.convert orbax-to-hf") for c in training)  # an indented block
    assert not any("[--" in c for doc in DOCS for c in doc_commands(REPO / doc))  # synopses live in text blocks
    assert scale("python train.py --gin.TRAIN_STEPS=300").endswith("--gin.TRAIN_STEPS=300" + TRAIN_SCALE)
    # The documented experiment runs are left to their tests, which must run exactly those files.
    ctx = {"llm_url": "http://127.0.0.1:1/v1", "grader": "unused"}
    covered = [c for doc in DOCS for c in doc_commands(REPO / doc) if substitute(c, ctx)[0] == "true"
               and any(f in c for f in COVERED_BY)]
    assert {f for f in COVERED_BY if any(f in c for c in covered)} == set(COVERED_BY)
    for doc_file, test_file in COVERED_BY.items():
        assert f'DOC_FILE = "{doc_file}"' in (REPO / test_file).read_text()

@pytest.mark.slow  # ~8 min on an idle 2-core machine: every documented command, scaled down, in order
def test_docs_commands_run_as_written(tmp_path, smollm2_dir):
    root = checkout(tmp_path)
    user_files(root)
    run_env = env(tmp_path)
    failures = []
    with serve(FlakyApp()) as llm_url:
        ctx = {"llm_url": llm_url, "grader": smollm2_dir}
        for doc in DOCS:
            for command in doc_commands(REPO / doc):
                line, reasons = substitute(command, ctx)
                if line.startswith("export "):
                    key, value = line[len("export "):].split("=", 1)
                    run_env[key] = value
                    continue
                start = time.monotonic()
                proc = subprocess.run(["bash", "-c", line], cwd=root, env=run_env, capture_output=True, text=True,
                                      timeout=900)
                print(f"[{time.monotonic() - start:5.0f}s exit {proc.returncode}] {line}", flush=True)
                if proc.returncode != 0:
                    failures.append(f"{doc}: {command}\n  ran: {line} ({'; '.join(reasons) or 'as written'})\n"
                                    f"  exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    assert not failures, "\n\n".join(failures)
