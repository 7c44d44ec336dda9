"""Chat templates and tokenization match transformers on the SmolLM2 folder."""
import json

import pytest
import transformers

from eval import chat

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a bird."},
     {"role": "assistant", "content": "A robin."}, {"role": "user", "content": "Another?"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(smollm2_dir, hf_tokenizer, messages):
    tok = chat.load(smollm2_dir)
    expected_text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.render_chat(messages) == expected_text
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert tok.encode_chat(messages) == list(expected["input_ids"])


def test_encode_decode_and_eos_match_transformers(smollm2_dir, hf_tokenizer):
    tok = chat.load(smollm2_dir)
    text = "Hello world, the cat sat on the mat."
    assert tok.encode(text) == hf_tokenizer(text).input_ids
    assert tok.decode(tok.encode(text) + [2]) == text
    assert tok.eos_ids == (hf_tokenizer.eos_token_id,) == (2,)


def test_generation_block_and_tokenizer_config_template(tmp_path, smollm2_dir):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    template = "{% for m in messages %}{% generation %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    tok = chat.load(tmp_path, extra_eos_ids=[0])
    assert tok.render_chat([{"role": "user", "content": "a<b"}]) == '[user]"a<b"'
    assert tok.eos_ids == (0, 2)


def test_missing_template_and_bad_messages_are_clear_errors(tmp_path, smollm2_dir):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    tok = chat.load(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="message 0 needs"):
        chat.load(smollm2_dir).render_chat([{"role": "user"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        chat.load(tmp_path / "missing")
