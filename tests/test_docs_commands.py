"""Every command in README.md and docs/*.md runs as written, scaled down, in a fresh checkout, in the shell the quick
start leaves the user in, and so does every command the demo's summary prints ("next:").

Which commands: every line of every ```bash block (tests/doc_commands.py), in the order README.md, then docs/*.md
alphabetically, all in ONE checkout and ONE shell (tests/doc_commands.Shell), like a new user following the docs: the
README's demo run and corpora are there for the docs' examples, and what a line activates or exports stays for the
next. Nothing here puts `python` on PATH: the shell starts without any virtual environment, and only the quick start's
`. .venv/bin/activate` provides one (the checkout's .venv links to the venv the tests run in, which has what the
quick start installs; tests/test_fresh_machine.py runs the quick start itself in a clean venv). The commands the demo
prints after its summary run right after it. A new command in a ```bash block is covered automatically.

Scaled down (`scale`): --count 12, --num_batches 2, --epochs 1, train.py with TRAIN_STEPS=2, BATCH_SIZE=8,
SEQ_LEN=64, 2 held-out batches and one microbatch; bench scripts with one seed and 2 steps. Inputs the docs say the
user brings are made first (`user_files`): a gzipped replay corpus at replay/ and bucket/replay/, synthetic documents at
bucket/synth/, and alpaca.jsonl.

`EXTERNAL` lists every command that needs something a CI machine does not have, each with why and its scaled-down
substitute: creating the venv and installing from PyPI, a hosted LLM (a local OpenAI-compatible server that answers
in the expected format), the Hugging Face Hub (a local server with the shared ANIMA copy), real 8B weights (the demo
run's export), a TPU slice and a bucket (one local process, local files), a hosted grader (SmolLM2-135M through
Inspect's hf provider) and the H100's 300-step runs (`--help`). The documented demo experiments (sweep and
durability) are run by their own tests from the documented files (`COVERED_BY`, checked below). `NEEDS_EXTRA` lists
the commands that need an optional extra: without it they must fail at once with one line naming the requirements
file (exit 3); with the TPU extra, `test_documented_commands_that_need_the_tpu_extra` runs them (CI's second pass).
A command that matches no entry runs unchanged apart from `scale`.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest

from tests import extras
from tests.doc_commands import DOCS, REPO, Shell, checkout, doc_commands, readme_command, user_env, venv_link
from tests.hub_server import serve_dataset
from tests.synth_servers import FlakyApp, serve

CREATE_VENV = r"^python3\.11 -m venv \.venv && (\. \.venv/bin/activate && )((pip install [^&]+) && )+"

# (pattern, why it cannot run on CI, substitute). Substitutes are applied in order to a command matching `pattern`.
Substitute = Callable[[str, dict], str]
EIGHT_B = r"/models/Llama-3\.1-8B-Instruct|/mnt/disks/llama-3\.1-8b|gs://BUCKET/models/llama-3\.1-8b"
EXTERNAL: list[tuple[str, str, Substitute]] = [
    (CREATE_VENV, "creates the venv and installs from PyPI: the checkout's .venv is the tests' venv, which has those "
     "packages (.ci/run runs the test command as written, tests/test_fresh_machine.py the quick start)",
     lambda c, ctx: re.sub(CREATE_VENV, r"\1", c)),
    (r"-m pytest -n 2 tests$", "the whole suite, which collects this file (collecting it "
     "checks pytest and xdist are there)",
     lambda c, ctx: c.replace("-m pytest -n 2 tests", "-m pytest -q -n 0 -p no:cacheprovider --collect-only "
                                                      "tests/test_docs_commands.py")),
    (r"^pip install (--no-deps )?-r requirements-\w+\.txt$", "installs from PyPI (--no-index checks that what is "
     "installed satisfies the file)", lambda c, ctx: c.replace("pip install", "python -m pip install --no-index", 1)),
    (r"^export OPENAI_API_KEY=", "a real API key", lambda c, ctx: "export OPENAI_API_KEY=test-key"),
    (r"^vllm serve ", "a GPU LLM server (the local test server stands in)", lambda c, ctx: "true"),
    (r"data\.synth generate ", "a hosted or GPU LLM (the local test server answers instead)",
     lambda c, ctx: re.sub(r"--base-url \S+", f"--base-url {ctx['llm_url']}", c)),
    (r"^python -m eval\.anima_data fetch", "the Hugging Face Hub (a local server with the shared ANIMA copy)",
     lambda c, ctx: f"HF_ENDPOINT={ctx['hub']} {c}"),
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
     + " --limit 1 --max_tokens 8 --grader_max_tokens 8"),
    (r"launch\.(aot|tpu) .*models/llama3_1_8b\.gin", "an 8B compile takes minutes and GBs of RAM (the tiny model instead)",
     lambda c, ctx: c.replace("models/llama3_1_8b.gin", "models/tiny.gin") + " --gin.BATCH_SIZE=16 --gin.SEQ_LEN=128"),
    (r"launch\.aot .*--gin\.INIT_FROM=runs/demo/hf", "an 8B compile takes minutes and GBs of RAM (the demo run's "
     "export as INIT_FROM, a small batch)", lambda c, ctx: c + " --gin.BATCH_SIZE=16 --gin.SEQ_LEN=128"),
    (r"^python sweep\.py sweeps/smollm2(_cpu)?\.toml$", "hours of SmolLM2 training on a CPU (--help)",
     lambda c, ctx: "python sweep.py --help"),
    (r"experiments\.durability sweeps/durability_smollm2(_cpu)?\.toml", "hours of SmolLM2 training on a CPU (--help)",
     lambda c, ctx: "python -m experiments.durability --help"),
    (r"^(python -m experiments\.durability sweeps/durability_demo|python sweep\.py sweeps/demo)\.toml$",
     "run as documented, scaled alike, by the test that checks its report (COVERED_BY)", lambda c, ctx: "true"),
    (r"bench/demo_device\.py |bench/demo_experiment\.py analyze |bench/gpu_experiment\.py ",
     "a GPU's runs (the script loads and parses its flags: --help; tests/test_gpu_experiment.py runs its dry run)",
     lambda c, ctx: c.split(" ", 2)[0] + " " + c.split(" ", 2)[1] + (" analyze" if " analyze " in c else "") + " --help"),
]
# (pattern, extra, what the command does without it): "error" = exit 3 and one line naming the requirements file;
# "install" = it is the line that installs the extra (CI's second pass does).
NEEDS_EXTRA = [(r"^python -m launch\.aot ", "tpu", "error"), (r"^python -m launch\.tpu .* --price ", "tpu", "error"),
               (r" --dry_run .*--topology=", "tpu", "error"),
               (r"^pip install -r requirements-tpu\.txt$", "tpu", "install"),
               (r"^pip install -r requirements-seqio\.txt$", "seqio", "install"), (r"eval\.anima ", "eval", "error")]
RUN_BY_ITS_OWN_TEST = {"tpu"}  # with the extra, these run in test_documented_commands_that_need_the_tpu_extra
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


def needs_extra(command: str) -> tuple[str, str] | None:
    return next(((extra, without) for pattern, extra, without in NEEDS_EXTRA if re.search(pattern, command)), None)


def printed_next_commands(output: str) -> list[str]:
    """The commands train.py's summary prints under "next:" (each on its own line, an optional `    # why` after)."""
    _, sep, rest = output.partition("\nnext:\n")
    commands = []
    for line in rest.splitlines() if sep else []:
        if not line.startswith("  "):
            break
        commands.append(line.strip().split("    # ", 1)[0])
    return commands


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


def user_shell(tmp: pathlib.Path) -> tuple[pathlib.Path, Shell]:
    """A fresh checkout with the user's inputs, and the shell of a user who has not activated anything yet. The
    machine's settings the whole suite runs with stay: CPU JAX with 8 fake devices, no hub, the shared caches."""
    root = checkout(tmp)
    venv_link(root)
    user_files(root)
    env = user_env(tmp / "home", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", INSPECT_LOG_DIR=str(tmp / "inspect_logs"),
                   DOCMIX_CACHE=os.environ.get("DOCMIX_CACHE", str(REPO / "cache")))
    return root, Shell(root, env)


def hub_dataset() -> tuple[str, str, dict[str, str]]:
    """ANIMA on the stand-in Hub: the repository and revision eval.anima_data fetches, the card's configs."""
    from eval import anima_data

    return anima_data.HUB_REPO, anima_data.HUB_REVISION, {"questions": "questions.jsonl",
                                                          "dimensions": "dimensions.jsonl"}


def timed(shell: Shell, line: str) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = shell.run(line)
    print(f"[{time.monotonic() - start:5.0f}s exit {proc.returncode}] {line}", flush=True)
    return proc


def without_extra(proc: subprocess.CompletedProcess, extra: str) -> str | None:
    """None if the command failed as it must without `extra`: exit 3, one line naming the requirements file."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    wanted = extras.EXTRAS[extra][1]
    if proc.returncode == 3 and len(lines) == 1 and ": error: " in lines[0] and wanted in lines[0]:
        return None
    return f"without the {extra} extra: expected exit 3 and one line naming {wanted}, got exit {proc.returncode}"


def test_every_doc_command_is_found():
    """The extraction itself: continuations joined, comments dropped, text blocks skipped, indented fences read."""
    readme = doc_commands(REPO / "README.md")
    assert any(c.startswith("python -m trainer.preview --gin_file=runs/midtrain.gin ")
               and c.endswith("--num_batches 50") for c in readme)
    training = doc_commands(REPO / "docs" / "training.md")
    assert any(c.startswith("python -m trainer.convert orbax-to-hf") for c in training)  # an indented block
    assert not any("[--" in c for doc in DOCS for c in doc_commands(doc))  # synopses live in text blocks
    assert scale("python train.py --gin.TRAIN_STEPS=300").endswith("--gin.TRAIN_STEPS=300" + TRAIN_SCALE)
    # The quick start activates its venv, so the commands after it say `python`; none reaches for .venv/bin.
    assert ". .venv/bin/activate && " in readme_command("train.py")
    assert not [c for doc in DOCS for c in doc_commands(doc) if ".venv/bin/" in c.replace(". .venv/bin/activate", "")]
    assert substitute(readme_command("train.py"), {})[0] == ". .venv/bin/activate && python train.py" + TRAIN_SCALE
    # The documented experiment runs are left to their tests, which must run exactly those files.
    ctx = {"llm_url": "http://127.0.0.1:1/v1", "grader": "unused", "hub": "http://127.0.0.1:1"}
    covered = [c for doc in DOCS for c in doc_commands(doc) if substitute(c, ctx)[0] == "true"
               and any(f in c for f in COVERED_BY)]
    assert {f for f in COVERED_BY if any(f in c for c in covered)} == set(COVERED_BY)
    for doc_file, test_file in COVERED_BY.items():
        assert f'DOC_FILE = "{doc_file}"' in (REPO / test_file).read_text()
    summary = "== docmix run runs/demo ==\nnext:\n  python a    # why\n  python -m b --x 'c d'\nmetrics ...\n"
    assert printed_next_commands(summary) == ["python a", "python -m b --x 'c d'"]


def test_ci_runs_the_readme_test_command_first_then_only_the_extras_tests():
    """.ci/run reads the README's test command (as written) and runs it before installing any extra; the extras then
    only add the tests marked with them."""
    ci = (REPO / ".ci" / "run").read_text()
    readme_tests = readme_command("-m pytest")
    assert "requirements-seqio" not in readme_tests and "requirements-tpu" not in readme_tests
    assert 'readme_command("-m pytest")' in ci and 'bash -c "$readme_tests"' in ci
    first, second = ci.split('bash -c "$readme_tests"')
    assert "requirements-seqio" not in first and "requirements-tpu" not in first and "pip install" not in first
    assert "-r requirements-seqio.txt -r requirements-tpu.txt" in second and '-m "seqio or tpu"' in second


@pytest.mark.slow  # ~9 min on an idle 2-core machine: every documented command, scaled down, in order
def test_docs_commands_run_as_written(tmp_path, smollm2_dir, anima_dir):
    root, shell = user_shell(tmp_path)
    failures = []
    quick_start = readme_command("train.py")
    with serve(FlakyApp()) as llm_url, serve_dataset(anima_dir, *hub_dataset()) as hub:
        ctx = {"llm_url": llm_url, "grader": smollm2_dir, "hub": hub["endpoint"]}
        for doc in DOCS:
            for command in doc_commands(doc):
                line, reasons = substitute(command, ctx)
                extra = needs_extra(command)
                reason = extras.missing(extra[0]) if extra else None
                if extra and not reason and extra[0] in RUN_BY_ITS_OWN_TEST:
                    print(f"[left to test_documented_commands_that_need_the_{extra[0]}_extra] {line}", flush=True)
                    continue
                if extra and reason and extra[1] == "install":
                    print(f"[not run: it installs the {extra[0]} extra this run is without] {line}", flush=True)
                    continue
                proc = timed(shell, line)
                if extra and reason:
                    problem = without_extra(proc, extra[0])
                    if problem:
                        failures.append(f"{doc.name}: {command}\n  ran: {line}\n  {problem}: {proc.stderr[-1500:]}")
                    continue
                if proc.returncode != 0:
                    failures.append(f"{doc.name}: {command}\n  ran: {line} ({'; '.join(reasons) or 'as written'})\n"
                                    f"  exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
                if command == quick_start:
                    printed = printed_next_commands(proc.stdout)
                    if len(printed) < 4:
                        failures.append(f"the demo printed {len(printed)} next commands:\n{proc.stdout[-2000:]}")
                    for hint in printed:  # from a scaled run: only a new train.py run needs scaling
                        hint_line = hint if "--gin.TRAIN_STEPS=" in hint else scale(hint)
                        hint_proc = timed(shell, hint_line)
                        if hint_proc.returncode != 0:
                            failures.append(f"printed by the demo: {hint}\n  ran: {hint_line}\n  exit "
                                            f"{hint_proc.returncode}: {hint_proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.tpu
def test_documented_commands_that_need_the_tpu_extra(tmp_path):
    """What the main test leaves out when libtpu is installed: the documented commands that need it, as written (the
    8B compiles scaled down), after the quick start's activation."""
    from launch import aot

    root, shell = user_shell(tmp_path)
    shell.run(". .venv/bin/activate")
    stand_in = root / "runs" / "demo" / "hf"  # the 8B INIT_FROM's stand-in: a compile reads only its config.json
    stand_in.mkdir(parents=True)
    aot.write_init_from("models/demo.gin", stand_in)
    commands = [c for doc in DOCS for c in doc_commands(doc) if (needs_extra(c) or ("",))[0] == "tpu"]
    assert any(c.startswith("python -m launch.aot ") for c in commands)
    failures = []
    for command in commands:
        line, reasons = substitute(command, {})
        proc = timed(shell, line)
        if proc.returncode != 0:
            failures.append(f"{command}\n  ran: {line} ({'; '.join(reasons) or 'as written'})\n"
                            f"  exit {proc.returncode}: {proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
