"""Batched KV-cached text generation for any docmix checkpoint (HF folder, run directory or step directory).

    python -m eval.generate --model PATH --prompt "The committee reviewed the farm report and" [--prompt ...] [--chat] [--max_new_tokens 64]
        [--temperature 0.7 --top_p 0.9 --seed 0] [--stop "\\n\\n"] [--json]

Prompts of different lengths are left-padded into one batch (padding is segment 0, which attention never sees), so
every row writes the same cache slot at each step. Each row has its own sampling settings and PRNG stream, so a
row's text does not depend on the rest of the batch. The device runs ahead asynchronously; the host looks at the new
tokens every `check_every` steps for end-of-sequence ids, stop strings and length limits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import storage
from eval import chat, loading, sampling
from eval.sampling import SamplingParams
from models import decode

# Prompt and cache lengths are rounded up to these multiples so that a server compiles a handful of shapes, not one
# per request. Extra left padding is invisible to attention.
PROMPT_BUCKET = 64
CACHE_BUCKET = 128


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated ids, without the EOS token and cut at a stop string
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_keys(seeds: jax.Array, step: jax.Array) -> jax.Array:
    """One PRNG key per row for this step, fold_in(key(seed), step): seeds uint32 `[batch]` -> keys `[batch]`."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)


def _prefill(graphdef, state, cache, tokens, segment_ids, seeds, temperature, top_p):
    """Left-padded tokens/segment_ids `[batch, prompt]` -> (first new tokens `[batch]`, their positions, cache)."""
    logits, positions, cache = decode.prefill(nnx.merge(graphdef, state), tokens, segment_ids, cache)
    return sampling.select_tokens(logits, _row_keys(seeds, 0), temperature, top_p), positions, cache


def _step(graphdef, state, cache, tokens, positions, step, seeds, temperature, top_p):
    """The previous tokens `[batch]` at `positions` `[batch]` -> (next tokens `[batch]`, cache)."""
    logits, cache = decode.decode_step(nnx.merge(graphdef, state), tokens, positions, cache)
    return sampling.select_tokens(logits, _row_keys(seeds, step), temperature, top_p), cache


# Plain jax.jit, not models.xla_cpu.jit: on a CPU its accurate float32 dots make a decode step of a few rows several
# times slower, and greedy text still matches transformers without them (tests/test_generate.py).
_prefill_jit = jax.jit(_prefill, static_argnums=0, donate_argnums=2)
_step_jit = jax.jit(_step, static_argnums=0, donate_argnums=2)


def _finish(ids: list[int], params: SamplingParams, eos_ids: frozenset[int], detokenize: Callable[[Sequence[int]], str],
            prompt_tokens: int, final: bool) -> Completion | None:
    """The completion of one row if its generated `ids` end it (EOS, stop string, length), else None."""
    ids = ids[:params.max_new_tokens]  # the batch may run longer than this row asked for
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    body = ids if eos_at is None else ids[:eos_at]
    text = detokenize(body)
    cut = sampling.find_stop(text, params.stop)
    if cut is not None:
        # Keep the tokens up to the one that completed the stop string.
        n = next(k for k in range(1, len(body) + 1) if sampling.find_stop(detokenize(body[:k]), params.stop) is not None)
        return Completion(text[:cut], tuple(body[:n]), "stop", prompt_tokens)
    if eos_at is not None:
        return Completion(text, tuple(body), "stop", prompt_tokens)
    if len(ids) >= params.max_new_tokens or final:
        return Completion(text, tuple(ids), "length", prompt_tokens)
    return None


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, eos_ids: Sequence[int], detokenize: Callable[[Sequence[int]], str], pad_id: int = 0,
             check_every: int = 8) -> list[Completion]:
    """Generates a completion for each prompt (token ids) in one batch.

    `params` is one SamplingParams for all rows or one per row. `detokenize` turns ids into text (for stop strings);
    `eos_ids` end a row. The cache holds max(prompt) + max(max_new_tokens) slots, rounded up to buckets.
    """
    batch = len(prompts)
    row_params = [params] * batch if isinstance(params, SamplingParams) else list(params)
    if batch == 0 or len(row_params) != batch:
        raise ValueError(f"need at least one prompt and one SamplingParams per prompt, got {batch} and {len(row_params)}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty (generation needs at least one token, e.g. BOS)")
    max_new = max(p.max_new_tokens for p in row_params)
    prompt_len = _round_up(max(lengths), PROMPT_BUCKET)
    cache_len = _round_up(prompt_len + max_new, CACHE_BUCKET)
    limit = model.config.max_position_embeddings
    if max(lengths) + max_new > limit:
        raise ValueError(f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                         f"max_position_embeddings ({limit})")

    tokens, segment_ids = decode.left_pad(prompts, pad_id)
    extra = ((0, 0), (prompt_len - tokens.shape[1], 0))  # more left padding, up to the bucket
    tokens, segment_ids = np.pad(tokens, extra, constant_values=pad_id), np.pad(segment_ids, extra)
    temperature = jnp.asarray([p.temperature for p in row_params], jnp.float32)
    top_p = jnp.asarray([p.top_p for p in row_params], jnp.float32)
    seeds = jnp.asarray([p.seed for p in row_params], jnp.uint32)

    graphdef, state = nnx.split(model)
    cache = decode.init_cache(model, batch, cache_len)
    next_tokens, next_positions, cache = _prefill_jit(graphdef, state, cache, tokens, segment_ids, seeds,
                                                      temperature, top_p)
    eos = frozenset(int(e) for e in eos_ids)
    generated: list[list[int]] = [[] for _ in range(batch)]
    done: dict[int, Completion] = {}
    pending = [next_tokens]
    for step in range(1, max_new + 1):
        final = step == max_new
        if final or step % check_every == 0:
            new = np.stack([np.asarray(t) for t in pending], axis=1)  # [batch, n_new]; waits for the device
            pending = []
            for row in range(batch):
                if row in done:
                    continue
                generated[row].extend(int(t) for t in new[row])
                completion = _finish(generated[row], row_params[row], eos, detokenize, lengths[row], final)
                if completion is not None:
                    done[row] = completion
            if len(done) == batch:
                break
        next_tokens, cache = _step_jit(graphdef, state, cache, next_tokens, next_positions, np.int32(step), seeds,
                                       temperature, top_p)
        next_positions = next_positions + 1
        pending.append(next_tokens)
    return [done[row] for row in range(batch)]


@dataclasses.dataclass(frozen=True)
class Generator:
    """A loaded checkpoint with its tokenizer, generating from text prompts or chat messages."""

    model: nnx.Module
    tokenizer: chat.ChatTokenizer
    name: str

    def encode(self, prompt: str | Sequence[Mapping[str, Any]]) -> list[int]:
        """A plain string is tokenized as is; a list of {"role", "content"} messages goes through the chat template."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode_chat(prompt)

    def generate_ids(self, prompts: Sequence[Sequence[int]],
                     params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        return generate(self.model, prompts, params, eos_ids=self.tokenizer.eos_ids, detokenize=self.tokenizer.decode)

    def __call__(self, prompts: Sequence[str | Sequence[Mapping[str, Any]]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        return self.generate_ids([self.encode(p) for p in prompts], params)


def load(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None) -> Generator:
    """Loads an HF folder, a run directory (latest checkpoint) or a step directory, with its tokenizer."""
    model, config, tokenizer_dir = loading.load_model(path, mesh=mesh)
    tokenizer = chat.load(tokenizer_dir, extra_eos_ids=config.eos_token_ids)
    return Generator(model=model, tokenizer=tokenizer, name=storage.absolute(path).name)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder, run directory or checkpoint step directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampling_flags(parser)
    args = parser.parse_args(argv)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop=tuple(args.stop), seed=args.seed)
    generator = load(args.model)
    prompts = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    for prompt, completion in zip(args.prompt, generator(prompts, params)):
        if args.json:
            print(json.dumps({"prompt": prompt, **dataclasses.asdict(completion)}))
        else:
            print(f"### {prompt}\n{completion.text}\n")


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m eval.generate"))
