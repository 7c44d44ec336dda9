"""KV-cached decoding: cached steps reproduce the full forward pass; SmolLM2 logits and greedy generation match
transformers."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import decode, hf_io
from tests.test_models_util import build_hf, jax_logits, random_tokens

ENGLISH = ("The old lighthouse keeper climbed the spiral stairs every evening, carrying a small lamp and a notebook "
           "in which he recorded the weather, the ships that passed, and the birds that rested on the railing.")
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "Photosynthesis is the process by which"]


@nnx.jit
def _cached_logits(model, prompt_tokens, prompt_segments, continuation):
    """Prefill the left-padded prompts, then feed `continuation` `[batch, n]` one token at a time."""
    cache = decode.init_cache(model, prompt_tokens.shape[0], prompt_tokens.shape[1] + continuation.shape[1])
    first, positions, cache = decode.prefill(model, prompt_tokens, prompt_segments, cache)
    steps = [first]
    for i in range(continuation.shape[1] - 1):
        logits, cache = decode.decode_step(model, continuation[:, i], positions + i, cache)
        steps.append(logits)
    return jnp.stack(steps, axis=1)


def test_cached_decode_matches_full_forward(tmp_path):
    build_hf("mistral", tmp_path)  # window 5 < sequence length, so the window applies inside the cache
    model, _ = hf_io.load_pretrained(tmp_path)
    prompts = [random_tokens(1, 3, seed=5)[0].tolist(), random_tokens(1, 6, seed=6)[0].tolist()]
    continuation = random_tokens(2, 5, seed=7)
    tokens, segments = decode.left_pad(prompts)
    cached = np.asarray(_cached_logits(model, tokens, segments, continuation))
    full_rows = [p + c for p, c in zip(prompts, continuation.tolist())]  # right-padded into one batch
    full_tokens, full_segments = (np.array([np.pad(r, (0, 11 - len(r))) for r in rows], np.int32)
                                  for rows in (full_rows, [[1] * len(r) for r in full_rows]))
    full = jax_logits(model, full_tokens, full_segments)
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(cached[row], full[row, len(prompt) - 1: len(prompt) + 4], rtol=0, atol=1e-5)


def test_left_pad_and_generate_validation():
    tokens, segments = decode.left_pad([[5, 6], [7]], pad_id=9)
    assert tokens.tolist() == [[5, 6], [9, 7]] and segments.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        decode.left_pad([[1], []])


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    import torch
    import transformers
    from tokenizers import Tokenizer

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model, config = hf_io.load_pretrained(smollm2_dir)
    return model, hf_model, Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    import torch

    model, hf_model, tokenizer = smollm2
    ids = np.array([tokenizer.encode(ENGLISH).ids], np.int32)
    assert ids.shape[1] > 30
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)).logits.numpy()
    got = jax_logits(model, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2):
    import torch

    model, hf_model, tokenizer = smollm2
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    eos = model.config.eos_token_ids
    got = decode.generate(model, prompts, max_new_tokens=32)
    for prompt, ours in zip(prompts, got):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=32, do_sample=False, eos_token_id=list(eos),
                                    pad_token_id=eos[0])
        want = out[0, len(prompt):].tolist()
        assert ours == want, (tokenizer.decode(ours), tokenizer.decode(want))
    assert sum(len(g) for g in got) > 48  # real continuations, not immediate EOS
