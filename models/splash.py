"""The Pallas splash-attention kernel (TPU) behind the `kernels.attend` signature.

Splash attention is a TPU kernel; for other devices it runs in Pallas interpret mode (slow, for tests only). The
choice follows the devices the computation is compiled for (the `jax.set_mesh` mesh), not the host's default backend,
so an ahead-of-time compile for a TPU topology on a CPU machine (`launch.aot`) compiles the real kernel. It
covers full-sequence attention (training, scoring, prefill without a longer cache): q_len == kv_len with aligned slot
indices. Segment masking uses splash `SegmentIds` (padding, segment 0, only ever attends to padding, so padding rows
differ from the reference while every real token agrees); the causal / sliding-window pattern is a static splash mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from models import sharding
from models.kernels import AttentionMask

LANES = 128


def _kernel(seq: int, group: int, window: int | None, interpret: bool):
    """A splash MQA kernel for one KV head and its `group` query heads (built at trace time: its mask-info arrays
    become constants of the traced computation, so it must not be cached across traces)."""
    if window is None:
        one_head = splash.CausalMask((seq, seq))
    else:  # HF: key visible iff 0 <= q - kv < window
        one_head = splash.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
    block = 512 if seq % 512 == 0 else 128
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(splash.MultiHeadMask([one_head] * group), block_sizes=sizes,
                                                interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                     interpret: bool | None = None) -> jax.Array:
    """q `[batch, seq, heads, head_dim]`, k/v `[batch, seq, kv_heads, head_dim]` -> `[batch, seq, heads, head_dim]`.

    Under a `jax.set_mesh` mesh the kernel runs per device inside `jax.shard_map`: batch split like activations
    (`act_batch`), heads split over `tensor` when the KV heads divide evenly (a Pallas call cannot be partitioned
    automatically, so without this every device would gather and compute the whole attention).
    """
    seq = q.shape[1]
    if k.shape[1] != seq:
        raise NotImplementedError("splash attention covers full sequences (q_len == kv_len); cached decoding "
                                  f"(q_len={seq}, kv_len={k.shape[1]}) uses the 'xla' kernel")
    mesh = jax.sharding.get_abstract_mesh()
    if interpret is None:
        interpret = target_platform(mesh) != "tpu"
    local = functools.partial(_local_attention, window=mask.window, interpret=interpret)
    if mesh.empty:
        return local(q, k, v, mask.q_segment, mask.kv_segment)
    mesh_shape = dict(mesh.shape)
    batch_axes = sharding.logical_to_spec(("act_batch",), q.shape[:1], mesh_shape)[0]
    tensor = mesh_shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and k.shape[2] % tensor == 0 else None
    heads_spec, rows_spec = P(batch_axes, None, head_axis, None), P(batch_axes, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(heads_spec,) * 3 + (rows_spec,) * 2, out_specs=heads_spec,
                         check_vma=False)(q, k, v, mask.q_segment, mask.kv_segment)


def target_platform(mesh: jax.sharding.AbstractMesh) -> str:
    """The platform of the devices being compiled for: the mesh's, else the default backend's."""
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _local_attention(q, k, v, q_segment, kv_segment, *, window: int | None, interpret: bool) -> jax.Array:
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    # Kernel blocks are multiples of 128 slots: pad with segment 0, which real tokens never attend to.
    padded = -(-seq // LANES) * LANES
    pad = ((0, 0), (0, padded - seq))
    q, k, v = (jnp.pad(x, pad + ((0, 0), (0, 0))) for x in (q, k, v))
    segments = splash.SegmentIds(q=jnp.pad(q_segment, pad), kv=jnp.pad(kv_segment, pad))
    kernel = _kernel(padded, heads // kv_heads, window, interpret)
    qg = (q * (head_dim ** -0.5)).astype(q.dtype).reshape(batch, padded, kv_heads, heads // kv_heads, head_dim)
    qg = qg.transpose(0, 2, 3, 1, 4)  # [batch, kv_heads, group, seq, head_dim]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]

    def one_example(q_e, k_e, v_e, seg_e):
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=seg_e))(q_e, k_e, v_e)

    out = jax.vmap(one_example)(qg, kt, vt, segments)  # [batch, kv_heads, group, seq, head_dim]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, heads, head_dim)
    return out[:, :seq].astype(q.dtype)
