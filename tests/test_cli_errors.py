"""Every command line's bad-input path: one clear stderr line `PROG: error: MESSAGE` naming the thing at fault, no
traceback, and the exit code from the one table (exit_codes.py, README "Exit codes"). CASES covers every command
line of the repository (test_every_command_line_has_a_case)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

import exit_codes
import train
from data import demo
from tests import extras
from tests.synth_servers import FlakyApp, serve
from trainer import demo_assets

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(args: list[str], tmp: pathlib.Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "DOCMIX_TRACEBACK"}
    clean.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=tmp, env=clean, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def refusing_server():
    """An OpenAI-compatible server that refuses every request's key (HTTP 401)."""
    with serve(FlakyApp(lambda key: ["401"] * 100)) as url:
        yield url


@pytest.fixture(scope="module")
def bad(tmp_path_factory, refusing_server) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "a_file").write_text("not a directory\n")
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "category": "x"}) + "\n"
    (d / "good_pairs.jsonl").write_text(good)
    (d / "pairs.jsonl").write_text(good + '{"prompt": "p"\n')
    hf = d / "hf_bad_index"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                                "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                                "num_attention_heads": 2}))
    (hf / "model.safetensors.index.json").write_text('{"weight_map": 5}')
    header = d / "hf_bad_header"
    header.mkdir()
    (header / "config.json").write_text((hf / "config.json").read_text())
    (header / "model.safetensors").write_bytes((12).to_bytes(8, "little") + b'{"a": broken')
    assets = demo.prepare(demo_assets.cache_dir())
    corpus = gzip.compress(assets.replay_jsonl.read_bytes()[:200_000])
    (d / "cut.jsonl.gz").write_bytes(corpus[: len(corpus) // 2])     # a download cut short
    (d / "plain.jsonl.gz").write_bytes(assets.replay_jsonl.read_bytes()[:5000])  # not gzip, named .gz
    tok = d / "tokenizer"
    tok.mkdir()
    text = (assets.tokenizer_dir / "tokenizer.json").read_text()
    (tok / "tokenizer.json").write_text(text[: len(text) // 2])
    init = d / "init_from"
    init.mkdir()
    (init / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 8,')
    (d / "nan.gin").write_text("OptimizerConfig.learning_rate = nan\n")
    theirs = d / "their_run"
    theirs.mkdir()
    (theirs / "config.gin").write_text("lr = 0.1\n")
    (theirs / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return {"dir": d, "file": d / "a_file", "pairs": d / "pairs.jsonl", "good_pairs": d / "good_pairs.jsonl",
            "index": hf, "header": header, "cut_gz": d / "cut.jsonl.gz", "plain_gz": d / "plain.jsonl.gz",
            "tokenizer": tok, "init_from": init, "nan_gin": d / "nan.gin", "theirs": theirs,
            "welfare": assets.welfare_jsonl, "refusing": refusing_server}


PREVIEW_CORPUS = ["-m", "trainer.preview", "--gin_file=runs/demo.gin", "--gin_file=mixtures/replay_synthetic.gin",
                  "--gin.SYNTHETIC_FILES=('{welfare}',)"]
GENERATE = ["-m", "data.synth", "generate", "--spec", "animal_welfare", "--count", "2", "--model", "m"]
CASES = [  # (id, argv with {placeholders}, exit code, words the one error line must contain[, environment])
    ("preview-binding", ["-m", "trainer.preview", "--gin.TRAIN_STEPS=-1"], 2, ["train_steps must be", "TRAIN_STEPS"]),
    ("preview-no-init-from", ["-m", "trainer.preview", "--gin_file=runs/midtrain.gin"], 2, ["INIT_FROM is not set"]),
    ("preview-gin-typo", ["-m", "trainer.preview", "--gin.TrainConfig.trian_steps=3"], 2, ["trian_steps", "gin: "]),
    ("train-model-dir-is-a-file", [str(REPO / "train.py"), "--gin.MODEL_DIR={file}"], 2,
     ["MODEL_DIR={file} is a file"]),
    ("train-share-without-rows", [str(REPO / "train.py"), "--gin.MODEL_DIR={dir}/never_made", "--gin.TRAIN_STEPS=2",
                                  "--gin.BATCH_SIZE=8", "--gin.MIXTURE_WEIGHTS={{'replay': 0.99, 'synthetic': 0.01}}"],
     2, ["'synthetic' 0.01 gets no row in the run: 16 rows per data shard", "MixtureConfig.allow_unrealized_shares"]),
    ("train-bad-probe-set", [str(REPO / "train.py"), "--gin.MODEL_DIR={dir}/never_made",
                             "--gin.TrainConfig.probe_sets=('{pairs}',)"], 2, ["pairs.jsonl:2"]),
    ("probes-missing-model", ["-m", "eval.probes", "--model", "{dir}/nope", "--pairs", "{good_pairs}"], 2,
     ["{dir}/nope does not exist"]),
    ("probes-bad-pairs", ["-m", "eval.probes", "--model", "{dir}", "--pairs", "{pairs}"], 2, ["pairs.jsonl:2"]),
    ("serve-missing-model", ["-m", "eval.serve", "--model", "{dir}/nope"], 2, ["{dir}/nope does not exist"]),
    ("convert-bad-index", ["-m", "trainer.convert", "hf-to-orbax", "--hf_dir", "{index}", "--out", "{dir}/o1"], 2,
     ["model.safetensors.index.json", "weight_map"]),
    ("convert-bad-header", ["-m", "trainer.convert", "hf-to-orbax", "--hf_dir", "{header}", "--out", "{dir}/o2"], 2,
     ["model.safetensors: unreadable safetensors header"]),
    ("report-missing-run", ["-m", "eval.report", "{dir}/nope", "--out", "{dir}/r"], 2, ["{dir}/nope does not exist"]),
    ("synth-target-tokens-0", ["-m", "data.synth", "render", "--spec", "animal_welfare", "--target-tokens", "0",
                               "--out", "{dir}/x.jsonl"], 2, ["--target-tokens", "must be >= 1, got 0"]),
    ("synth-target-tokens-negative", ["-m", "data.synth", "render", "--spec", "animal_welfare", "--target-tokens",
                                      "-5", "--out", "{dir}/x.jsonl"], 2, ["--target-tokens", "must be >= 1, got -5"]),
    # Bad input files, each named.
    ("preview-cut-gzip", [*PREVIEW_CORPUS, "--gin.REPLAY_FILES=('{cut_gz}',)"], 2,
     ["{cut_gz}: unreadable gzip file after ", "Compressed file ended before the end-of-stream marker"]),
    ("preview-not-gzip", [*PREVIEW_CORPUS, "--gin.REPLAY_FILES=('{plain_gz}',)"], 2,
     ["{plain_gz}: unreadable gzip file after 0 lines (Not a gzipped file"]),
    ("preview-corrupt-tokenizer", ["-m", "trainer.preview", "--gin.MixtureConfig.tokenizer='{tokenizer}'"], 2,
     ["{tokenizer}/tokenizer.json: not a tokenizer.json that the tokenizers library can read"]),
    ("preview-init-from-bad-config", ["-m", "trainer.preview", "--gin_file=runs/midtrain.gin",
                                      "--gin.INIT_FROM={init_from}"], 2, ["{init_from}/config.json: not valid JSON"]),
    ("preview-nan-in-a-gin-file", ["-m", "trainer.preview", "--gin_file={nan_gin}"], 2,
     ["gin: cannot parse 'nan' (nan.gin, line 1): NaN and infinity have no Python literal"]),
    ("probes-missing-pairs", ["-m", "eval.probes", "--model", "{dir}", "--pairs", "{dir}/missing.jsonl"], 2,
     ["python -m eval.probes: error: {dir}/missing.jsonl: no such file"]),
    ("train-someone-elses-model-dir", [str(REPO / "train.py"), "--gin.MODEL_DIR={theirs}"], 2,
     ["train.py: error: MODEL_DIR={theirs} holds files docmix did not write (config.gin, metrics.jsonl)"]),
    # Every other command line.
    ("sweep-missing-file", [str(REPO / "sweep.py"), "{dir}/nope.toml"], 2,
     ["sweep.py: error: {dir}/nope.toml: experiment file not found"]),
    ("durability-missing-file", ["-m", "experiments.durability", "{dir}/nope.toml"], 2,
     ["python -m experiments.durability: error: {dir}/nope.toml: experiment file not found"]),
    ("synth-generate-unreachable", [*GENERATE, "--max-retries", "0", "--base-url", "http://127.0.0.1:9/v1", "--out",
                                    "{dir}/g.jsonl"], 3, ["python -m data.synth: error: cannot connect to "
                                                          "http://127.0.0.1:9/v1: all 1 attempts of"]),
    ("synth-generate-refused", [*GENERATE, "--base-url", "{refusing}", "--out", "{dir}/g401.jsonl"], 3,
     ["python -m data.synth: error: HTTP 401 from {refusing}", "the server refuses this client; no API key was sent "
      "($OPENAI_API_KEY is not set): ", "Incorrect API key provided"]),
    ("synth-filter-missing-input", ["-m", "data.synth", "filter", "{dir}/nope.jsonl", "--out", "{dir}/f.jsonl"], 2,
     ["python -m data.synth: error: {dir}/nope.jsonl: no such file"]),
    ("pretokenize-corrupt-tokenizer", ["-m", "trainer.pretokenize", "--component", "replay", "--output_dir", "{dir}/pt",
                                       "--gin.MixtureConfig.tokenizer='{tokenizer}'"], 2,
     ["python -m trainer.pretokenize: error: {tokenizer}/tokenizer.json: not a tokenizer.json"]),
    ("heldout-missing-model", ["-m", "eval.heldout", "--model", "{dir}/nope"], 2,
     ["python -m eval.heldout: error: ", "{dir}/nope"]),
    ("generate-missing-model", ["-m", "eval.generate", "--model", "{dir}/nope", "--prompt", "x"], 2,
     ["python -m eval.generate: error: model path {dir}/nope does not exist"]),
    ("anima-data-unreachable-hub", ["-m", "eval.anima_data", "fetch", "--out", "{dir}/anima"], 3,
     ["python -m eval.anima_data: error: cannot fetch http://127.0.0.1:9/api/datasets/"],
     {"HF_ENDPOINT": "http://127.0.0.1:9"}),
    ("convert-missing-gguf", ["-m", "models.convert", "gguf-to-hf", "--gguf", "{dir}/nope.gguf", "--out", "{dir}/g"],
     2, ["python -m models.convert: error: {dir}/nope.gguf: no such GGUF file"]),
    ("launch-tpu-local-model-dir", ["-m", "launch.tpu", "--name", "x", "--zone", "z", "--accelerator_type", "v5p-8",
                                    "--", "--gin.MODEL_DIR=runs/x"], 2,
     ["python -m launch.tpu: error: MODEL_DIR=runs/x: must be on gs://"]),
    ("launch-job-no-model-dir", ["-m", "launch.job", "--launch_id", "x"], 2,
     ["python -m launch.job: error: --model_dir is required"]),
    ("launch-emulator-bad-flag", ["-m", "launch.emulator", "--bucket"], 2,
     ["python -m launch.emulator: error: argument --bucket: expected one argument"]),
]
if extras.missing("eval"):  # without the eval extra, eval.anima says so (its own test below checks it with the extra)
    CASES.append(("anima-without-the-extra", ["-m", "eval.anima", "--model", "m", "--grader", "g"], 3,
                  ["needs the eval extra", "requirements-eval.txt"]))
else:
    CASES += [
        ("anima-unreachable-grader", ["-m", "eval.anima", "--model", "http://127.0.0.1:9/v1", "--grader",
                                      "openai/gpt-4o-mini"], 3, ["cannot reach http://127.0.0.1:9/v1/models"]),
        # No key: one line, exit 3, before loading the model (this folder's weights are unreadable, which loading
        # would report instead).
        ("anima-no-api-key", ["-m", "eval.anima", "--model", "{header}", "--grader", "openai/gpt-4o-mini"], 3,
         ["--grader openai/gpt-4o-mini: ", "OPENAI_API_KEY", "defined in the environment"]),
    ]
if importlib.util.find_spec("gcsfs") is None:  # without the client a gs:// corpus cannot be read
    CASES.append(("preview-gs-without-client", ["-m", "trainer.preview", "--gin.REPLAY_FILES=('gs://b/x.jsonl',)",
                                                "--gin_file=runs/demo.gin", "--gin_file=mixtures/replay_synthetic.gin",
                                                "--gin.SYNTHETIC_FILES=('{pairs}',)"], 3,
                  ["gs://b/x.jsonl", "gcsfs"]))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_the_documented_exit_code(case, bad):
    _, argv, code, words, *env = case
    proc = run([a.format(**bad) for a in argv], REPO, *env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ": error: " in lines[-1], lines[-1]
    assert "[bold]" not in proc.stderr, proc.stderr  # no console markup in a plain-text error
    for word in words:
        assert word.format(**bad) in lines[-1], lines[-1]
    assert not (bad["dir"] / "never_made").exists()  # found before the run's directory is made


ELSEWHERE = {"launch.aot", "eval.anima"}  # the two tests below run them as if their extra were not installed
NOT_COMMANDS = {"launch/local_cloud.py"}  # a stand-in for gcloud in rehearsals: it answers as gcloud does


def sources() -> list[pathlib.Path]:
    """The repository's Python files, tests, benchmark scripts and NOT_COMMANDS aside."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "bench", "cache", "__pycache__")
                   and not (pathlib.Path(root) / d).is_symlink()]
        found += [pathlib.Path(root) / name for name in files if name.endswith(".py")]
    return [path for path in found if path.relative_to(REPO).as_posix() not in NOT_COMMANDS]


def command_lines() -> set[str]:
    """Every command line of the repository: the modules and scripts with a `__main__` block, as `python -m` names
    them."""
    found = set()
    for path in sources():
        if 'if __name__ == "__main__":' in path.read_text():
            parts = path.relative_to(REPO).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return found


def test_every_command_line_has_a_case():
    covered = set(ELSEWHERE) | {c[1][1] if c[1][0] == "-m" else pathlib.Path(c[1][0]).stem for c in CASES}
    found = command_lines()
    assert {"train", "sweep", "data.synth", "eval.serve", "launch.tpu"} <= found  # the search finds them
    assert found - covered == set(), "command lines without a bad-input case in CASES"


def test_no_command_line_prints_its_own_errors():
    """Errors go through exit_codes (one prefix, one table): no `print(..., file=sys.stderr)` followed by a return
    of a code; the ones left are warnings and progress."""
    pattern = re.compile(r"print\((?:[^()]|\([^()]*\))*file=sys\.stderr\)\s*\n\s*(?:return|sys\.exit)\(?\s*\d")
    offenders = [f"{path.relative_to(REPO)}: {m.group(0)[:80]!r}" for path in sources()
                 for m in pattern.finditer(path.read_text())]
    assert offenders == []


def test_launch_aot_without_the_tpu_extra_is_one_line_and_exit_3():
    """As if libtpu were not installed (the README's test command installs no TPU extra)."""
    code = "import runpy, sys; sys.modules['libtpu'] = None; runpy.run_module('launch.aot', run_name='__main__')"
    proc = run(["-c", code, "--gin_file=runs/midtrain.gin", "--gin_file=models/tiny.gin", "--topology=v5p:2x2x1"],
               REPO)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == ["python -m launch.aot: error: needs the TPU extra (libtpu is not "
                                                "installed): pip install -r requirements-tpu.txt"]


def test_anima_without_the_eval_extra_is_one_line_and_exit_3():
    """As if Inspect were not installed: the import fails and the command says which extra to install."""
    code = "import runpy, sys; sys.modules['inspect_ai'] = None; runpy.run_module('eval.anima', run_name='__main__')"
    proc = run(["-c", code, "--model", "m", "--grader", "g"], REPO)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == ["python -m eval.anima: error: needs the eval extra (inspect_ai is not "
                                                "installed): pip install -r requirements-eval.txt"]


def test_internal_errors_are_exit_4_with_the_traceback(capsys):
    def broken(argv):
        raise TypeError("a bug")

    assert exit_codes.run(broken, "prog") == exit_codes.INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("prog: internal error")


def test_exit_code_table_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for code in (0, 1, 2, 3, 4, 130):
        assert f"\n| {code} |" in readme, code


def test_next_commands_paste_into_bash_as_given(tmp_path):
    """The summary's "next:" lines, pasted into bash, give exactly the argument lists train.py meant."""
    argv = ["--gin.MODEL_DIR=runs/x y", "--gin.MIXTURE_WEIGHTS={'replay': 0.95, 'synthetic': 0.05}",
            "--gin.REPLAY_FILES=('replay/*.jsonl.gz',)", "--gin.TRAIN_STEPS=10"]
    for line in [train.shell_line(["python", "train.py", *argv]), train.shell_line(["x", "it's \"$HOME\" `a`!"])]:
        echoed = subprocess.run(["bash", "-c", f"printf '%s\\n' {line.split(' ', 1)[1]}"], cwd=tmp_path,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        assert echoed == shlex.split(line)[1:]
    assert train.shell_word(argv[1]) == '--gin.MIXTURE_WEIGHTS="{\'replay\': 0.95, \'synthetic\': 0.05}"'


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: a read-only directory needs another user")
def test_read_only_model_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(PermissionError, match="is not a writable directory"):
        train.check_model_dir(str(ro / "run"))


@pytest.mark.parametrize("module, words", [
    ("trainer.preview", ["usage: python -m trainer.preview", "--gin.KEY=VALUE", "Examples:", "--gin.INIT_FROM"]),
    ("eval.anima", ["usage: python -m eval.anima", "examples:", "--dataset_dir"]),
])
def test_help_names_the_command_and_shows_examples(module, words):
    proc = run(["-m", module, "--help"], REPO)
    assert proc.returncode == 0, proc.stderr
    for word in words:
        assert word in proc.stdout, proc.stdout
