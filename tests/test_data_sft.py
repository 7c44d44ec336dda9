"""SFT rendering with SmolLM2's chat template: same tokens as transformers, loss exactly on assistant text + end-of-turn."""
from __future__ import annotations

import numpy as np
import pytest

from data.config import Component, MixtureConfig
from data.pipeline import build
from tests.test_data_util import write_jsonl

CHATS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, in French?"},
                  {"role": "assistant", "content": "Rouge — c'est «rouge».\nVoilà."}]},
]
ALPACA = [{"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen"},
          {"instruction": "Say hi.", "input": "", "output": "Hi!"}]


def spans(mask: np.ndarray) -> list[slice]:
    """Contiguous runs of mask > 0."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (mask > 0).astype(int), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2])]


def rows_of(pipeline, n_docs):
    """(tokens, loss_mask) of each whole document, from first-fit rows of one document each."""
    docs = []
    while len(docs) < n_docs:
        b = next(pipeline.iterator)
        for toks, seg, mask in zip(b["tokens"], b["segment_ids"], b["loss_mask"]):
            for s in range(1, seg.max() + 1):
                docs.append((toks[seg == s], mask[seg == s]))
    return docs[:n_docs]


@pytest.mark.parametrize("fmt, records", [("chat", CHATS), ("alpaca", ALPACA)])
def test_sft_matches_transformers_template_and_masks_assistant_only(smollm2_dir, tmp_path, fmt, records):
    import transformers

    path = write_jsonl(tmp_path / "sft.jsonl", records)
    comp = Component("sft", paths=(str(path),), format=fmt, packing="first_fit", packing_bins=1, shuffle=False,
                     max_epochs=1, loss_weight=2.0)
    p = build(MixtureConfig(components=(comp,), weights={"sft": 1.0}, tokenizer=str(smollm2_dir), seq_len=512,
                            batch_size=1, block_size=8))
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for record, (tokens, mask) in zip(records, rows_of(p, len(records))):
        messages = record["messages"] if fmt == "chat" else [
            {"role": "user", "content": record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")},
            {"role": "assistant", "content": record["output"]}]
        ref = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        np.testing.assert_array_equal(tokens, np.asarray(ref))
        want = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert [hf.decode(tokens[s]) for s in spans(mask)] == want
        assert set(np.unique(mask)) == {0.0, 2.0}


def test_sft_mixes_with_text_component(smollm2_dir, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Plain replay text about the weather."}] * 4)
    comps = (Component("sft", paths=(str(chat),), format="chat"), Component("replay", paths=(str(text),)))
    p = build(MixtureConfig(components=comps, weights={"sft": 0.9, "replay": 0.1}, tokenizer=str(smollm2_dir),
                            seq_len=64, batch_size=10, block_size=10))
    b = next(p.iterator)
    np.testing.assert_array_equal(np.bincount(b["component"], minlength=2), [9, 1])
    replay_rows = b["loss_mask"][b["component"] == 1]
    assert (replay_rows[b["segment_ids"][b["component"] == 1] > 0] == 1).all()  # all text tokens are targets


def test_sft_bad_records(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHATS[0], {"messages": [{"role": "robot", "content": "x"}]},
                                                {"messages": [{"role": "user", "content": "only a question"}]}])
    comp = Component("sft", paths=(str(path),), format="chat")
    p = build(MixtureConfig(components=(comp,), weights={"sft": 1.0}, tokenizer=str(smollm2_dir), seq_len=64,
                            batch_size=1, block_size=8))
    assert p.reports["sft"].bad == [f"{path}:2: messages[0] must be {{'role': one of "
                                    "('system', 'user', 'assistant', 'tool'), 'content': str}"]
    assert p.reports["sft"].empty == 1  # no assistant turn: nothing to train on


def test_records_the_template_cannot_split_are_reported_at_start_up(smollm2_dir, tmp_path):
    # A template that trims content: an assistant turn with outer whitespace cannot be located in the rendering.
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    (tok / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "chat_template": ' + __import__("json").dumps(template) + "}")
    rewritten = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello  "}]}
    path = write_jsonl(tmp_path / "sft.jsonl", [CHATS[0], rewritten])
    comp = Component("sft", paths=(str(path),), format="chat")
    p = build(MixtureConfig(components=(comp,), weights={"sft": 1.0}, tokenizer=str(tok), seq_len=64,
                            batch_size=1, block_size=8))
    assert p.reports["sft"].bad == [f"{path}:2: chat template rewrote the assistant content of messages[1]"]
    next(p.iterator)  # the good record still trains
