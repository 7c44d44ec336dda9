"""Every command line's bad-input path: one clear stderr line naming the thing at fault, no traceback, and the exit
code from the one table (exit_codes.py, README "Exit codes")."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

import exit_codes
import train
from tests import extras

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(args: list[str], tmp: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "DOCMIX_TRACEBACK"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, pathlib.Path]:
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
    return {"dir": d, "file": d / "a_file", "pairs": d / "pairs.jsonl", "good_pairs": d / "good_pairs.jsonl",
            "index": hf, "header": header}


CASES = [  # (id, argv with {placeholders}, exit code, words the one error line must contain)
    ("preview-binding", ["-m", "data.preview", "--gin.TRAIN_STEPS=-1"], 2, ["train_steps must be", "TRAIN_STEPS"]),
    ("preview-no-init-from", ["-m", "data.preview", "--gin_file=runs/midtrain.gin"], 2, ["INIT_FROM is not set"]),
    ("preview-gin-typo", ["-m", "data.preview", "--gin.TrainConfig.trian_steps=3"], 2, ["trian_steps", "gin: "]),
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
    ("convert-bad-index", ["-m", "models.convert", "hf-to-orbax", "--hf_dir", "{index}", "--out", "{dir}/o1"], 2,
     ["model.safetensors.index.json", "weight_map"]),
    ("convert-bad-header", ["-m", "models.convert", "hf-to-orbax", "--hf_dir", "{header}", "--out", "{dir}/o2"], 2,
     ["model.safetensors: unreadable safetensors header"]),
    ("report-missing-run", ["-m", "eval.report", "{dir}/nope", "--out", "{dir}/r"], 2, ["{dir}/nope does not exist"]),
    ("synth-target-tokens-0", ["-m", "data.synth", "render", "--spec", "animal_welfare", "--target-tokens", "0",
                               "--out", "{dir}/x.jsonl"], 2, ["--target-tokens", "must be >= 1, got 0"]),
    ("synth-target-tokens-negative", ["-m", "data.synth", "render", "--spec", "animal_welfare", "--target-tokens",
                                      "-5", "--out", "{dir}/x.jsonl"], 2, ["--target-tokens", "must be >= 1, got -5"]),
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
    CASES.append(("preview-gs-without-client", ["-m", "data.preview", "--gin.REPLAY_FILES=('gs://b/x.jsonl',)",
                                                "--gin_file=runs/demo.gin", "--gin_file=mixtures/replay_synthetic.gin",
                                                "--gin.SYNTHETIC_FILES=('{pairs}',)"], 3,
                  ["gs://b/x.jsonl", "gcsfs"]))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_the_documented_exit_code(case, bad):
    _, argv, code, words = case
    proc = run([a.format(**bad) for a in argv], REPO)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ": error: " in lines[-1], lines[-1]
    assert "[bold]" not in proc.stderr, proc.stderr  # no console markup in a plain-text error
    for word in words:
        assert word.format(**bad) in lines[-1], lines[-1]
    assert not (bad["dir"] / "never_made").exists()  # found before the run's directory is made


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
    ("data.preview", ["usage: python -m data.preview", "--gin.KEY=VALUE", "Examples:", "--gin.INIT_FROM"]),
    ("eval.anima", ["usage: python -m eval.anima", "examples:", "--dataset_dir"]),
])
def test_help_names_the_command_and_shows_examples(module, words):
    proc = run(["-m", module, "--help"], REPO)
    assert proc.returncode == 0, proc.stderr
    for word in words:
        assert word in proc.stdout, proc.stdout
