"""The name and layout map between this package's parameter tree and Hugging Face tensor names.

HF linear weights are `[out, in]` with heads flattened; ours are `[in..., out...]` with heads split out, so
`ours = hf.T.reshape(our_shape)` and `hf = ours.reshape(prod(in_dims), -1).T`. Norm scales and embeddings are equal.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: `path` in the (stacked-layout) param tree, its HF name template and how to convert."""

    path: tuple[str, ...]
    hf_name: str  # may contain "{i}" (the layer index)
    in_axes: int  # number of leading input axes of a kernel; 0 = copied as is (norms, biases, embeddings)

    def hf_names(self, num_layers: int) -> list[str]:
        if "{i}" not in self.hf_name:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(num_layers)]

    def to_ours(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor -> our layout (one layer's worth for per-layer params)."""
        return (tensor.T if self.in_axes else tensor).reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """Our array (one layer's worth) -> the HF tensor."""
        if not self.in_axes:
            return array.reshape(-1) if array.ndim > 1 and "bias" in self.path else array
        return array.reshape(math.prod(array.shape[: self.in_axes]), -1).T


def tensor_maps(config: ModelConfig) -> Iterator[TensorMap]:
    """Every parameter of `config`'s model. Per-layer paths start with "layers" (stacked layout, no layer index)."""
    yield TensorMap(("embed", "embedding"), "model.embed_tokens.weight", 0)
    layer = "model.layers.{i}."
    yield TensorMap(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", 0)
    for proj in ("q_proj", "k_proj", "v_proj"):
        yield TensorMap(("layers", "attn", proj, "kernel"), layer + f"self_attn.{proj}.weight", 1)
        if config.qkv_bias:
            yield TensorMap(("layers", "attn", proj, "bias"), layer + f"self_attn.{proj}.bias", 0)
    yield TensorMap(("layers", "attn", "o_proj", "kernel"), layer + "self_attn.o_proj.weight", 2)
    if config.qk_norm:
        yield TensorMap(("layers", "attn", "q_norm", "scale"), layer + "self_attn.q_norm.weight", 0)
        yield TensorMap(("layers", "attn", "k_norm", "scale"), layer + "self_attn.k_norm.weight", 0)
    yield TensorMap(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", 0)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        yield TensorMap(("layers", "mlp", proj, "kernel"), layer + f"mlp.{proj}.weight", 1)
    yield TensorMap(("final_norm", "scale"), "model.norm.weight", 0)
    if not config.tie_embeddings:
        yield TensorMap(("lm_head", "kernel"), "lm_head.weight", 1)


def hf_shape(tmap: TensorMap, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that maps to one layer's `our_shape`."""
    if not tmap.in_axes:
        return (math.prod(our_shape),) if "bias" in tmap.path else our_shape
    return (math.prod(our_shape[tmap.in_axes:]), math.prod(our_shape[: tmap.in_axes]))
