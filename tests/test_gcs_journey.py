"""A TPU user's run where everything lives in a bucket, on the local GCS emulator: INIT_FROM is an HF folder on
gs:// (loaded by byte range, each host reading its share), a 2-run sweep trains from it with its out_dir on gs://,
its runs are evaluated and reported where they live, and converted gs:// -> gs://. Nothing lands in the working
directory."""
from __future__ import annotations

import csv
import io
import json
import pathlib
import re
import sys

import numpy as np
import pytest
from flax import nnx

from tests import extras, gcs_emulator, multiproc

pytestmark = extras.require("gcs")

import storage  # noqa: E402

ROOT = f"gs://{gcs_emulator.BUCKET}/journey"
HF = f"{ROOT}/hf"
TINY_HF = dict(architecture="LlamaForCausalLM", vocab_size=6000, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=False, bos_token_id=1, eos_token_id=0,
               pad_token_id=2, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def hf_in_bucket(gcs, tmp_path_factory) -> pathlib.Path:
    """A tiny Llama as a Hugging Face folder (with the demo tokenizer) on local disk and at HF in the bucket, and the
    demo corpora at ROOT/data. Returns the local folder."""
    from models import hf_io
    from models.config import ModelConfig
    from models.transformer import Transformer
    from trainer.demo_assets import demo_asset

    local = tmp_path_factory.mktemp("hf") / "hf"
    model = Transformer(ModelConfig(**TINY_HF), rngs=nnx.Rngs(0))
    hf_io.save_pretrained(model, local, dtype="float32", tokenizer_dir=demo_asset("tokenizer"))
    storage.upload_tree(local, HF, last=("config.json",))
    storage.copy_file(demo_asset("replay"), f"{ROOT}/data/replay.jsonl")
    storage.copy_file(demo_asset("welfare"), f"{ROOT}/data/welfare.jsonl")
    return local


def params_of(model) -> dict[str, np.ndarray]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


@pytest.mark.slow  # ~15 s: two processes start, join and load
def test_each_host_reads_its_share_of_a_gs_checkpoint(hf_in_bucket, tmp_path):
    """Two processes (2 devices each) load the gs:// folder onto one mesh: each reads half of the tensor bytes by
    byte range (its log says so, and the bucket served about one copy in all, not two), and the parameters equal a
    local load."""
    from models import hf_io
    from models.safetensors_read import TensorReader

    out = tmp_path / "params.npz"
    args = ["-m", "tests.load_sharded", "--hf_dir", HF, "--out", str(out)]
    with gcs_emulator.recording() as served:
        with LoadCluster(2, 2, args, tmp_path / "logs") as cluster:  # the emulator's client env is inherited
            cluster.wait_ok(300)
    shares = [int(re.search(r"process \d of 2 read (\d+) of the \d+ tensor bytes", cluster.stderr(i)).group(1))
              for i in range(2)]
    tensors = TensorReader(hf_io.weight_files(hf_in_bucket))
    assert shares == [sum(tensors.nbytes(name) for name in tensors.files) // 2] * 2  # every tensor splits in two
    from_bucket = sum(r.served for r in served if r.handler == "download" and r.name.endswith("model.safetensors"))
    assert from_bucket < 1.1 * storage.Path(HF, "model.safetensors").stat().length  # one copy in all, not two
    loaded = dict(np.load(out))
    local = params_of(hf_io.load_pretrained(hf_in_bucket)[0])
    assert sorted(loaded) == sorted(local)
    for name in local:
        np.testing.assert_array_equal(loaded[name], local[name], err_msg=name)


class LoadCluster(multiproc.Cluster):
    """multiproc.Cluster running `python ARGS` (tests.load_sharded) instead of train.py."""

    def command(self, process_id: int, port: int) -> list[str]:
        return [sys.executable, *self.args, *multiproc.distributed_flags(port, self.num_processes, process_id)]


SWEEP = f"""
out_dir = "{ROOT}/sweep"
gin_file = ["runs/midtrain.gin"]
gin = ["INIT_FROM = '{HF}'", "REPLAY_FILES = ('{ROOT}/data/replay.jsonl',)",
       "BATCH_SIZE = 4", "SEQ_LEN = 32", "CHECKPOINT_EVERY = 2", "TrainConfig.log_every = 1",
       "TrainConfig.progress_bar = False", "TrainConfig.peak_flops = 1e12", "OptimizerConfig.warmup_steps = 0",
       "CheckpointConfig.export_dtype = 'float32'", "MixtureConfig.block_size = 4"]
seeds = [0]
shares = [0.0, 0.25]
budget = "fixed_total_tokens"
corpus_macro = "SYNTHETIC_FILES"
train_steps = 2

[corpora]
welfare = "{ROOT}/data/welfare.jsonl"

[eval]
pairs = ["eval/probe_sets/animal_welfare.jsonl"]
heldout = true
heldout_batches = 1
bootstrap = 200
"""


@pytest.mark.slow  # ~1.5 min on an idle 2-core machine: two train.py runs, their evaluation, reports, conversions
def test_a_run_lives_in_the_bucket_from_init_to_report(hf_in_bucket, tmp_path, monkeypatch, capsys):
    import sweep
    from eval import generate, heldout, probes, report
    from trainer import checkpoint, convert, metrics_file

    monkeypatch.chdir(tmp_path)  # the user's working directory: nothing may land here
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # the train.py subprocesses
    (tmp_path / "s.toml").write_text(SWEEP)
    assert sweep.main(["s.toml"]) == 0, capsys.readouterr()
    runs = sorted(storage.Path(ROOT, "sweep", "runs").iterdir())
    assert [r.name.split("-")[1] for r in runs] == ["base", "welfare"]
    run, hf = str(runs[1]), str(runs[1] / "hf")
    assert [r["step"] for r in metrics_file.read(f"{run}/metrics.jsonl")] == [1, 2]
    status = json.loads(storage.Path(ROOT, "sweep", "status.json").read_text())
    assert {s["status"] for s in status.values()} == {"done"}
    assert "step 2" in storage.Path(ROOT, "sweep", "logs", f"{runs[1].name}.log").read_text()  # uploaded
    table = list(csv.DictReader(io.StringIO(storage.Path(ROOT, "sweep", "report", "runs.csv").read_text())))
    assert {r["status"] for r in table} == {"done"} and all(float(r["heldout/replay/loss"]) > 0 for r in table)
    assert storage.Path(ROOT, "sweep", "report", "vs_share.png").stat().length > 1000

    # The run evaluated where it lives, each result beside its checkpoint in the bucket.
    capsys.readouterr()
    generate.main(["--model", run, "--prompt", "The farm", "--max_new_tokens", "3", "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prompt"] == "The farm"
    pairs = str(multiproc.REPO / "eval" / "probe_sets" / "animal_welfare.jsonl")
    probes.main(["--model", hf, "--pairs", pairs, "--bootstrap", "50", "--json"])
    assert storage.Path(run, "eval", "hf", "probes-animal_welfare.json").is_file()
    held = heldout.main(["--model", run, "--batches", "1", "--json"])
    assert json.loads(storage.Path(run, "eval", "2", "heldout.json").read_text()) == held
    report.main([run, "--out", f"{ROOT}/report"])
    rows = json.loads(storage.Path(ROOT, "report", "report.json").read_text())
    assert {r["checkpoint"] for r in rows} >= {"2", "hf"} and rows[0]["train/loss"] > 0

    # Converted bucket to bucket: an HF folder, then a params-only run directory, the same parameters.
    assert convert.main(["orbax-to-hf", "--ckpt", run, "--out", f"{ROOT}/converted", "--dtype", "float32"]) == 0
    assert convert.main(["hf-to-orbax", "--hf_dir", f"{ROOT}/converted", "--out", f"{ROOT}/params"]) == 0
    trained = params_of(checkpoint.restore_model(run)[0])
    again = params_of(checkpoint.restore_model(f"{ROOT}/params")[0])
    for name in trained:
        np.testing.assert_array_equal(again[name], trained[name], err_msg=name)
    assert list(tmp_path.iterdir()) == [tmp_path / "s.toml"]  # no ./gs:/... anywhere
    assert not (multiproc.REPO / "gs:").exists()
