"""QA pairs for the instruction-tuning control arm, in the formats data.sft reads."""
import json
import re
import subprocess
import sys

import pytest

from data import sft
from data.synth.filters import FilterConfig, apply_filters
from data.synth.qa import qa_records
from data.synth.records import approx_tokens
from data.synth.spec import load_spec

STAMP = "2026-01-01T00:00:00Z"


@pytest.mark.parametrize("fmt", ["chat", "alpaca"])
def test_qa_records_are_valid_sft_records(fmt):
    spec = load_spec("animal_welfare")
    records = list(qa_records(spec, count=60, seed=0, fmt=fmt, created=STAMP))
    assert len({r["id"] for r in records}) == 60 and all(r["id"].startswith("animal_welfare-qa-s0-") for r in records)
    for r in records:
        messages = sft.messages_of(r, fmt)  # the trainer's own reader accepts it
        assert [m["role"] for m in messages] == ["user", "assistant"] and sft.has_assistant_text(messages)
        assert messages[0]["content"].endswith("?")
        assert 40 <= approx_tokens(messages[1]["content"]) <= 200
        assert "{" not in messages[1]["content"] and "[" not in messages[1]["content"]
        assert r["spec_hash"] == spec.hash and r["generator"].startswith("docmix-template-qa")
    assert len({r["axes"]["reasoning_approach"] for r in records}) == 7
    assert len({r["axes"]["institution"] for r in records}) == 50


def test_qa_is_deterministic_and_matches_between_formats():
    spec = load_spec("urban_density")
    chat = list(qa_records(spec, count=10, seed=3, fmt="chat", created=STAMP))
    assert chat == list(qa_records(spec, count=10, seed=3, fmt="chat", created=STAMP))
    alpaca = list(qa_records(spec, count=10, seed=3, fmt="alpaca", created=STAMP))
    for c, a in zip(chat, alpaca):
        assert c["messages"][0]["content"] == a["instruction"] and c["messages"][1]["content"] == a["output"]
        assert a["input"] == "" and c["id"] == a["id"]
    assert chat != list(qa_records(spec, count=10, seed=4, fmt="chat", created=STAMP))


def test_ai_identity_framing_reaches_answers():
    plain = list(qa_records(load_spec("animal_welfare"), count=20, seed=0, created=STAMP))
    framed = list(qa_records(load_spec("animal_welfare_ai"), count=20, seed=0, created=STAMP))
    framing = re.compile(r"\bAI\b|[Hh]elpful")
    assert all(framing.search(r["messages"][1]["content"]) for r in framed)
    assert not any(framing.search(r["messages"][1]["content"]) for r in plain)


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown QA format 'sharegpt'"):
        next(qa_records(load_spec("animal_welfare"), count=1, fmt="sharegpt", created=STAMP))


def test_cli_qa(tmp_path):
    out = tmp_path / "qa.jsonl"
    proc = subprocess.run([sys.executable, "-m", "data.synth", "qa", "--spec", "animal_welfare", "--count", "5",
                           "--format", "alpaca", "--timestamp", STAMP, "--out", str(out)],
                          capture_output=True, text=True, check=True)
    assert "wrote 5 alpaca QA pairs" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(5)) and all("output" in r for r in records)


def test_qa_pairs_pass_the_filters():
    records = list(qa_records(load_spec("animal_welfare_ai"), count=80, seed=0, created=STAMP))
    result = apply_filters(records, FilterConfig(min_tokens=40, max_tokens=250))
    assert result.removed == {"length": 0, "refusal": 0, "near_duplicate": 0}
