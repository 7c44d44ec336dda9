"""launch.aot: the run's real train step compiled for a TPU topology on this CPU machine (libtpu from
requirements-tpu.txt gives compile-only TPU devices). Checks the JSON: the step fits, FSDP shards the train state
exactly (bytes per chip = sharded bytes / chips + replicated bytes, and that is what the compiled step takes as
arguments besides the batch), and a step that cannot fit reports the compiler's out-of-memory error and a fix."""
import json
import os
import pathlib
import subprocess
import sys

from tests import extras

pytestmark = extras.require("tpu")  # libtpu gives the compile-only TPU devices

ROOT = pathlib.Path(__file__).resolve().parents[1]


def aot(*args: str) -> tuple[int, dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost"}
    out = subprocess.run([sys.executable, "-m", "launch.aot", "--gin_file=runs/demo.gin", "--json", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)


# A small model whose per-chip shards fill whole TPU memory tiles (8 x 128), so that the compiler's byte counts
# equal the logical ones: 8 layers, embed 512 / 4 chips = 128, 8 heads of 128, 32 rows / 4 chips = 8.
ALIGNED = ("--gin.BATCH_SIZE=32", "--gin.ModelConfig.vocab_size=1024", "--gin.ModelConfig.hidden_size=512",
           "--gin.ModelConfig.intermediate_size=512", "--gin.ModelConfig.num_heads=8", "--gin.ModelConfig.num_kv_heads=8",
           "--gin.ModelConfig.head_dim=128", "--gin.ModelConfig.num_layers=8")


def test_small_config_fits_a_v5e_slice_with_fsdp_sharded_state():
    rc, r = aot("--topology=v5e:2x2", "--gin.TrainConfig.loss_chunk=32", *ALIGNED)
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


def test_a_step_that_cannot_fit_reports_the_compiler_error_and_a_fix():
    rc, r = aot("--topology=v5e:2x2", "--gin.BATCH_SIZE=2048", "--gin.SEQ_LEN=2048", "--gin.ModelConfig.vocab_size=60000")
    assert rc == 1 and not r["fits"]
    assert "RESOURCE_EXHAUSTED" in r["error"] and r["needed_bytes"] > r["hbm_bytes"]
    assert "TrainConfig.loss_chunk" in r["suggestion"] and "microbatches" in r["suggestion"]


def test_splash_compiles_the_tpu_kernel_for_a_tpu_mesh_and_the_interpreter_for_cpu():
    """The kernel follows the devices compiled for, not the host's default backend (here: cpu)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from launch.aot import topology_devices
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
    from launch.aot import load_run, topology_devices
    from models import sharding

    run = load_run(["runs/demo.gin"], ["TrainConfig.mesh={'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 2}"])
    mesh = sharding.make_mesh(**run.train.mesh, devices=topology_devices("v5p:2x2x1", num_slices=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slices = [[d.slice_index for d in mesh.devices[i].flat] for i in range(2)]
    assert slices == [[0] * 4, [1] * 4]
