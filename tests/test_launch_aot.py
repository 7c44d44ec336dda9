"""launch.aot: the run's real train step compiled for a TPU topology on this CPU machine (libtpu from
requirements-tpu.txt gives compile-only TPU devices), given the train command's own arguments. Checks the JSON: the
step fits, FSDP shards the train state exactly (bytes per chip = sharded bytes / chips + replicated bytes, and that
is what the compiled step takes as arguments besides the batch), the memory numbers relate as printed, a run file
takes its network from INIT_FROM's config.json alone, and a step that cannot fit reports the compiler's
out-of-memory error and a fix."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests import extras

pytestmark = extras.require("tpu")  # libtpu gives the compile-only TPU devices

from launch import memory  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Analysis:
    """`compiled.memory_analysis()`'s fields, from a report."""
    def __init__(self, r: dict):
        self.peak_memory_in_bytes, self.argument_size_in_bytes = r["peak_bytes"], r["argument_bytes"]
        self.temp_size_in_bytes, self.output_size_in_bytes = r["temp_allocation_bytes"], r["output_bytes"]
        self.alias_size_in_bytes, self.generated_code_size_in_bytes = r["alias_bytes"], r["generated_code_bytes"]


def aot(*args: str, train: tuple[str, ...] = ("--gin_file=runs/demo.gin",)) -> tuple[int, dict]:
    """(exit status, the JSON report) of `launch.aot --json ARGS -- TRAIN`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost"}
    out = subprocess.run([sys.executable, "-m", "launch.aot", "--json", *args, "--", *train],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)


# A small model whose per-chip shards fill whole TPU memory tiles (8 x 128), so that the compiler's byte counts
# equal the logical ones: 8 layers, embed 512 / 4 chips = 128, 8 heads of 128, 32 rows / 4 chips = 8.
ALIGNED = ("--gin.BATCH_SIZE=32", "--gin.ModelConfig.vocab_size=1024", "--gin.ModelConfig.hidden_size=512",
           "--gin.ModelConfig.intermediate_size=512", "--gin.ModelConfig.num_heads=8", "--gin.ModelConfig.num_kv_heads=8",
           "--gin.ModelConfig.head_dim=128", "--gin.ModelConfig.num_layers=8")


def test_small_config_fits_a_v5e_slice_with_fsdp_sharded_state():
    rc, r = aot("--topology=v5e:2x2", train=("--gin_file=runs/demo.gin", "--gin.TrainConfig.loss_chunk=32", *ALIGNED))
    assert rc == 0 and r["fits"] and r["chips"] == 4 and r["device_kind"] == "TPU v5 lite"
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["loss_chunk"] == 32
    sharded = r["state_bytes"] - r["replicated_state_bytes"]
    assert r["replicated_state_bytes"] < 0.01 * r["state_bytes"]          # norm scales and counters only
    assert r["state_bytes_per_chip"] == sharded // 4 + r["replicated_state_bytes"]
    # What the compiled step takes per chip is that state plus the batch rows (scalars are padded to a tile).
    extra = r["argument_bytes"] - r["state_bytes_per_chip"] - r["batch_bytes_per_chip"]
    assert 0 <= extra <= 4096, extra
    assert 0 < r["peak_bytes"] < r["hbm_bytes"] and r["collectives"]["all-gather"] > 0
    assert r["collectives"]["reduce-scatter"] > 0  # FSDP gradients are reduce-scattered, not all-reduced in full
    # The numbers' relations (launch.memory): peak = arguments + live at the peak; free = HBM - peak; it fits when
    # at least 10% of HBM is free. The printed report says so, to its two decimals, and leaves out the compiler's
    # temporary allocation (buffers never live at once, summed: here more than is live at the peak).
    assert r["argument_bytes"] + r["live_at_peak_bytes"] == r["peak_bytes"] and r["live_at_peak_bytes"] > 0
    assert r["free_bytes"] == r["hbm_bytes"] - r["peak_bytes"] and r["fits"] == (r["free_fraction"] >= 0.1)
    assert r["temp_allocation_bytes"] > r["live_at_peak_bytes"]
    text = memory.format_report(r)
    peak, arguments, live = map(float, re.search(
        r"peak ([\d.]+) GiB = arguments ([\d.]+) GiB .*\+ ([\d.]+) GiB live at the peak", text).groups())
    free, hbm, share = map(float, re.search(r"free: ([\d.]+) GiB of ([\d.]+) GiB \(([\d.]+)%\); a run needs 10% "
                                             "free", text).groups())
    assert abs(arguments + live - peak) <= 0.011 and abs(hbm - peak - free) <= 0.011 and share > 10
    assert text.endswith("FITS") and "temporaries" not in text.split("live at the peak")[0]
    strict = {**r, **memory.from_analysis(Analysis(r), r["hbm_bytes"], free_fraction=share / 100 + 0.01)}
    assert not strict["fits"]                                  # a share of HBM free short of the required one


def test_a_run_file_with_init_from_reads_only_its_config_json(tmp_path):
    """The train command as written, without its data flags: a run file whose network is INIT_FROM's, INIT_FROM a
    folder holding nothing but config.json (no weights, no tokenizer), train.py's --distributed."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 128, "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False}))
    train = ("--distributed", f"--gin.INIT_FROM={tmp_path}", "--gin.MODEL_DIR=gs://bucket/runs/x",
             "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=256")
    rc, r = aot("--topology=v5e:2x2", "--gin_file=runs/midtrain.gin", train=train)  # gin flags before `--` too
    assert rc == 0 and r["fits"] and r["batch_size"] == 8 and r["seq_len"] == 256 and r["microbatches"] == 2
    # runs/midtrain.gin's own memory settings, with the network of config.json: 2 layers of 256 (attention 4 x 256^2,
    # MLP 3 x 256 x 512, 2 norms), untied 256 x 1024 embeddings, a final norm; 12 bytes per parameter with Adam
    assert (r["compute_dtype"], r["remat"], r["loss_chunk"]) == ("bfloat16", "full", 256)
    params = 2 * (4 * 256 * 256 + 3 * 256 * 512 + 2 * 256) + 2 * 256 * 1024 + 256
    assert 0 <= r["state_bytes"] - 12 * params <= 64                      # (+ the step counters)


def test_a_step_that_cannot_fit_reports_the_compiler_error_and_a_fix():
    rc, r = aot("--topology=v5e:2x2", train=("--gin_file=runs/demo.gin", "--gin.BATCH_SIZE=2048", "--gin.SEQ_LEN=2048",
                                             "--gin.ModelConfig.vocab_size=60000"))
    assert rc == 1 and not r["fits"]
    assert "RESOURCE_EXHAUSTED" in r["error"] and r["needed_bytes"] > r["hbm_bytes"]
    assert "TrainConfig.loss_chunk" in r["suggestion"] and "microbatches" in r["suggestion"]


def test_splash_compiles_the_tpu_kernel_for_a_tpu_mesh_and_the_interpreter_for_cpu():
    """The kernel follows the devices compiled for, not the host's default backend (here: cpu)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from launch.topology import topology_devices
    from models import sharding, splash
    from models.kernels import AttentionMask

    def lowered_text(devices):
        mesh = sharding.make_mesh(devices=devices)
        q = jax.ShapeDtypeStruct((4, 128, 4, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
        seg = jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=NamedSharding(mesh, P("fsdp")))

        def attend(q, k, v, seg):
            index = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), seg.shape)
            return splash.splash_attention(q, k, v, AttentionMask(seg, seg, index, index[0]))

        with jax.set_mesh(mesh):
            return jax.jit(attend).lower(q, q, q, seg).as_text()

    assert jax.default_backend() == "cpu"
    assert "tpu_custom_call" in lowered_text(topology_devices("v5e:2x2"))
    assert "tpu_custom_call" not in lowered_text(np.asarray(jax.devices()[:4]).tolist())


def test_run_config_mesh_spans_two_slices_with_the_data_axis_over_dcn():
    """TrainConfig.mesh's dcn_data lays the data axis across slices (slice outermost), fsdp inside each slice."""
    from launch.aot import load_run
    from launch.topology import topology_devices
    from models import sharding

    run = load_run(["runs/demo.gin"], ["TrainConfig.mesh={'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 2}"])
    mesh = sharding.make_mesh(**run.train.mesh, devices=topology_devices("v5p:2x2x1", num_slices=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slices = [[d.slice_index for d in mesh.devices[i].flat] for i in range(2)]
    assert slices == [[0] * 4, [1] * 4]


def test_launch_tpu_refuses_a_run_that_does_not_fit_before_creating_anything(tmp_path):
    """launch.tpu compiles the train command for the slice first: a run that cannot fit gets the compiler's
    numbers and what to change, exit 2, and no gcloud command at all (a gcloud on PATH records any call)."""
    (tmp_path / "gcloud").write_text(f"#!/bin/sh\ntouch {tmp_path / 'called'}\n")
    (tmp_path / "gcloud").chmod(0o755)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "launch.tpu", "--name=t1", "--zone=z", "--accelerator_type=v5litepod-4",
                          "--", "--gin_file=runs/demo.gin", "--gin.MODEL_DIR=gs://b/r", "--gin.BATCH_SIZE=2048",
                          "--gin.SEQ_LEN=2048", "--gin.ModelConfig.vocab_size=60000"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "checking that the step fits v5e:2x2" in out.stdout and "out of memory: " in out.stdout
    error = out.stderr.strip().splitlines()[-1]  # (libtpu may warn first that this machine has no TPU)
    assert error.startswith("python -m launch.tpu: error: the run does not fit v5e:2x2 with 10% of HBM free; nothing "
                            "was created. Try: --gin.TrainConfig.loss_chunk=")
    assert out.stderr.count("launch.tpu:") == 1 and not (tmp_path / "called").exists()


@pytest.mark.slow  # one compile of the tiny model for v5e:2x2: ~12 s idle, ~33 s on a loaded 2-core machine
def test_all_writes_each_configs_memory_and_flops_per_step_between_the_markers(tmp_path, monkeypatch):
    """`--all` on one shipped config (the tiny model, unrolled: one compile) and no run file: the row between the
    markers carries the FLOPs per chip of launch.aot.step_flops, and the text around the markers is kept."""
    from launch import aot

    monkeypatch.setattr(aot, "SHIPPED", (("models/tiny.gin", "v5e:2x2", ("ModelConfig.scan_layers=False",)),))
    monkeypatch.setattr(aot, "SHIPPED_RUNS", ())
    monkeypatch.setattr(aot, "ALL_BATCH", 16)
    monkeypatch.setattr(aot, "ALL_SEQ", 64)
    flops = []
    real = aot.step_flops
    monkeypatch.setattr(aot, "step_flops", lambda step, *a: flops.append(real(step, *a)) or flops[-1])
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(f"before\n{aot.TABLE_START}\nold rows\n{aot.TABLE_END}\nafter\n")
    assert aot.run_all([], bench) == 0
    text = bench.read_text()
    assert text.startswith(f"before\n{aot.TABLE_START}\n| config |") and text.endswith(f"{aot.TABLE_END}\nafter\n")
    [row] = [line for line in text.splitlines() if line.startswith("| models/tiny.gin | v5e:2x2 |")]
    assert len(flops) == 1 and flops[0] > 0 and row.endswith(f" | {flops[0] / 1e12:.3g} |")
