"""End to end against a real model: SmolLM2-135M-Instruct behind a test-only OpenAI-compatible server (transformers)."""
import asyncio
import json

import pytest

from data.synth.generate import GenerateConfig, generate
from data.synth.llm import ClientConfig
from data.synth.spec import load_spec
from tests.synth_servers import TransformersApp, serve


@pytest.mark.slow  # ~15 s on an idle 2-core box (model load + 4 short greedy requests); ~50 s under heavy load
def test_generate_with_real_small_model(smollm2_dir, tmp_path):
    app = TransformersApp(smollm2_dir, max_new_tokens_cap=24)
    spec = load_spec("animal_welfare")
    with serve(app) as url:
        client = ClientConfig(base_url=url, model="SmolLM2-135M-Instruct", api_key_env=None, timeout_s=120,
                              max_retries=1)
        direct = asyncio.run(generate(spec, GenerateConfig(out=tmp_path / "direct.jsonl", count=2, seed=0,
                                                           max_tokens=16, temperature=0.0, concurrency=1),
                                      client, progress=False))
        sdf = asyncio.run(generate(spec, GenerateConfig(out=tmp_path / "sdf.jsonl", count=1, seed=0, mode="sdf",
                                                        ideas_per_call=3, max_tokens=16, temperature=0.0),
                                   client, progress=False))
    assert direct.complete and sdf.complete and direct.written == 2 and sdf.written == 1
    records = [json.loads(l) for l in (tmp_path / "direct.jsonl").read_text().splitlines()]
    for r in records:
        words = r["text"].split()
        assert len(words) >= 5 and sum(w.isalpha() for w in words) >= 3, r["text"]  # real English-ish words
        assert r["generator"] == "direct:SmolLM2-135M-Instruct" and r["finish_reason"] in ("stop", "length")
        # The usage the record carries is what the model actually consumed and produced.
        assert r["usage"]["completion_tokens"] <= 16 and r["usage"]["prompt_tokens"] > 100
        assert r["usage"] in [{"prompt_tokens": q["prompt_tokens"], "completion_tokens": q["completion_tokens"]}
                              for q in app.requests]
    # sdf: one brainstorm request (with the premise list parsed), then one write request carrying a premise.
    ideas = [json.loads(l) for l in (tmp_path / "sdf.jsonl.ideas.jsonl").read_text().splitlines()]
    doc = json.loads((tmp_path / "sdf.jsonl").read_text())
    assert len(ideas) == 1 and doc["idea"] in ideas[0]["ideas"]
    assert len(app.requests) == 2 + 2
    assert f"Premise of this document: {doc['idea']}" in app.requests[-1]["body"]["messages"][-1]["content"]
