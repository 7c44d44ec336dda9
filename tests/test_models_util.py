"""Shared builders for the model tests: tiny random Hugging Face models saved to disk, and the torch reference forward."""
from __future__ import annotations

import pathlib

import numpy as np
from flax import nnx

from models import xla_cpu

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
# Architecture name -> (transformers config class name, extra config kwargs). Mistral's window is shorter than the
# test sequences so the sliding-window mask matters; Qwen3's head_dim differs from hidden/heads.
ARCHS = {
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=24)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
}


def build_hf(arch: str, out: pathlib.Path, seed: int = 0):
    """Saves a tiny random HF model of `arch` (fp32 safetensors) to `out`; returns the torch model (eval mode)."""
    import torch
    import transformers

    cls_name, extra = ARCHS[arch]
    config = getattr(transformers, cls_name)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise them so the tests see them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    import torch

    kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def random_tokens(batch: int, seq: int, seed: int = 0, vocab: int = 128) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)


def _call(graphdef, state, tokens, segment_ids, positions):
    return nnx.merge(graphdef, state)(tokens, segment_ids, positions)


_jitted_call = xla_cpu.jit(_call, static_argnums=0)


def jax_logits(model, tokens, segment_ids=None, positions=None) -> np.ndarray:
    """The model's logits under one jit with accurate CPU dots (see models.xla_cpu); eager op-by-op dispatch is
    slow on a loaded 2-core machine."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted_call(graphdef, state, tokens, segment_ids, positions))
