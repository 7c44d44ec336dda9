"""The KV-cached sampler on SmolLM2: greedy text equals transformers' generate; batching never changes a row."""
import json

import pytest
import torch
import transformers

from eval import generate
from eval.sampling import SamplingParams
from tests.test_anima import one_torch_thread  # noqa: F401 (a fixture)

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    "The quick brown fox",
    [{"role": "user", "content": "Write one sentence about why rivers matter to fish."}],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def generator(smollm2_dir):
    return generate.load(smollm2_dir)


@pytest.fixture(scope="module")
def greedy_batch(generator):
    return generator(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))


@pytest.mark.slow  # ~30 s on an idle 2-core machine: first compile of the batch plus transformers' own generate
def test_greedy_matches_transformers_generate(smollm2_dir, generator, greedy_batch, one_torch_thread):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for prompt, ours in zip(PROMPTS, greedy_batch):
        ids = generator.encode(prompt)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False)
        new = out[0, len(ids):].tolist()
        if new[-1] == tok.eos_token_id:
            new = new[:-1]
            assert ours.finish_reason == "stop"
        else:
            assert ours.finish_reason == "length" and len(new) == NEW_TOKENS
        assert list(ours.token_ids) == new
        assert ours.text == tok.decode(new, skip_special_tokens=True)
        assert ours.prompt_tokens == len(ids)
    assert greedy_batch[0].text == "The capital of France is Paris."  # ends with EOS well inside the budget


def test_batched_rows_equal_one_at_a_time(generator, greedy_batch):
    for prompt, batched in zip(PROMPTS, greedy_batch):
        assert generator([prompt], SamplingParams(max_new_tokens=NEW_TOKENS))[0] == batched
    # Sampling: each row has its own seed-derived stream, so batching does not change a sampled row either.
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=s) for s in (1, 2, 3)]
    batch = generator(PROMPTS, params)
    assert generator([PROMPTS[1]], params[1])[0] == batch[1]
    other_seed = generator([PROMPTS[1]], SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=99))[0]
    assert other_seed.token_ids != batch[1].token_ids


def test_stop_strings_and_per_row_limits(generator, greedy_batch):
    reference = greedy_batch[2]
    stop = reference.text[len(reference.text) // 2:][:6]
    cut = reference.text.index(stop)
    params = [SamplingParams(max_new_tokens=NEW_TOKENS), SamplingParams(max_new_tokens=5),
              SamplingParams(max_new_tokens=NEW_TOKENS, stop=("zzzz-never", stop))]
    first, short, stopped = generator(PROMPTS, params)
    assert first == greedy_batch[0]
    assert short.finish_reason == "length" and short.token_ids == greedy_batch[1].token_ids[:5]
    assert stopped.finish_reason == "stop" and stopped.text == reference.text[:cut]
    # The kept tokens are the shortest prefix whose text contains the stop string.
    n = len(stopped.token_ids)
    assert stopped.token_ids == reference.token_ids[:n]
    assert stop in generator.tokenizer.decode(reference.token_ids[:n])
    assert stop not in generator.tokenizer.decode(reference.token_ids[:n - 1])


def test_bad_requests_are_clear_errors(generator):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator([""], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generator(["hi"], SamplingParams(max_new_tokens=10**7))


def test_cli_prints_json(smollm2_dir, capsys, greedy_batch):
    generate.main(["--model", str(smollm2_dir), "--prompt", "What is the capital of France?", "--chat",
                   "--max_new_tokens", str(NEW_TOKENS), "--json"])
    (line,) = capsys.readouterr().out.strip().splitlines()
    record = json.loads(line)
    assert record["text"] == greedy_batch[0].text and record["finish_reason"] == "stop"


@pytest.mark.slow  # ~30 s: writes SmolLM2 as a docmix Orbax run directory, restores it, compiles again
def test_run_directory_gives_the_same_text(smollm2_dir, tmp_path, greedy_batch):
    from trainer import convert

    convert.hf_to_orbax(smollm2_dir, tmp_path / "run")
    restored = generate.load(tmp_path / "run")  # restore_model: latest checkpoint + the run's tokenizer/
    assert restored([PROMPTS[0]], SamplingParams(max_new_tokens=NEW_TOKENS))[0] == greedy_batch[0]
