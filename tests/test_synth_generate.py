"""LLM generation over real HTTP on 127.0.0.1: retries, rate limits, budget, resumability, key hygiene, sdf mode."""
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from data.synth.assign import assign
from data.synth.generate import GenerateConfig, generate
from data.synth.llm import ChatClient, ClientConfig, LLMError, retry_after_seconds
from data.synth.prompts import write_messages
from data.synth.records import approx_tokens
from data.synth.spec import load_spec
from data.synth.store import JsonlStore, StoreError
from tests.synth_servers import FlakyApp, serve

STAMP = "2026-01-01T00:00:00Z"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(spec, out, url, *, model="fake", timeout_s=2.0, max_retries=6, **kw):
    """One in-process generation run against `url` with fast backoff; kw go to GenerateConfig. The timeout leaves a
    loaded CI machine room to answer an ordinary request (a timed-out "ok" would count as an extra attempt)."""
    client = ClientConfig(base_url=url, model=model, api_key_env=None, timeout_s=timeout_s, max_retries=max_retries,
                          backoff_base_s=0.01, backoff_max_s=0.05)
    config = GenerateConfig(out=out, created=STAMP, **{"count": 6, "seed": 0, **kw})
    return asyncio.run(generate(spec, config, client, progress=False))


def _lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_flaky_server_every_failure_kind_is_retried(tmp_path):
    kinds = [["429", "500"], ["stall", "truncated"], ["500", "500", "429"], [], ["truncated"], ["429", "stall"]]
    keys: dict[str, int] = {}

    def script(key):
        keys.setdefault(key, len(keys))
        return kinds[keys[key] % len(kinds)]

    app = FlakyApp(script, retry_after="1", stall_s=3.0)
    with serve(app) as url:
        summary = _run(load_spec("animal_welfare"), tmp_path / "out.jsonl", url, concurrency=3)
    assert (summary.written, summary.failed, summary.already_done) == (6, 0, 0) and summary.complete
    records = _lines(tmp_path / "out.jsonl")
    assert sorted(r["index"] for r in records) == list(range(6)) and len({r["id"] for r in records}) == 6
    steps = [e["step"] for e in app.log]
    assert {s: steps.count(s) for s in ("429", "500", "stall", "truncated")} == {"429": 3, "500": 3, "stall": 2,
                                                                                   "truncated": 2}
    assert steps.count("ok") == 6
    # Retry-After: 1 is honoured: the retry after each 429 comes at least a second later.
    by_key = {}
    for e in app.log:
        by_key.setdefault(e["key"], []).append(e)
    for events in by_key.values():
        for a, b in zip(events, events[1:]):
            if a["step"] == "429":
                assert b["time"] - a["time"] >= 0.95
    attempts = {r["attempts"] for r in records}
    assert attempts == {1, 2, 3, 4}
    assert all(r["usage"] == {"prompt_tokens": 50, "completion_tokens": 120} for r in records)
    assert summary.tokens_used == 6 * 170
    # The requests carried the deterministic assignment and seeds.
    first = {e["key"]: e["body"] for e in app.log}
    spec = load_spec("animal_welfare")
    for r in records:
        body = next(b for b in first.values() if f"Issuing institution: {r['axes']['institution']}\n" in
                    b["messages"][1]["content"] and f"Domain: {r['axes']['domain']}\n" in b["messages"][1]["content"])
        assert body["max_tokens"] == int(spec.target_tokens * 1.5) and isinstance(body["seed"], int)


def test_retries_exhausted_and_non_retryable_fail_the_item_only(tmp_path):
    keys: dict[str, int] = {}

    def script(key):
        keys.setdefault(key, len(keys))
        return {0: ["500"] * 10, 1: ["echo400"]}.get(keys[key], [])

    app = FlakyApp(script)
    with serve(app) as url:
        summary = _run(load_spec("urban_density"), tmp_path / "out.jsonl", url, count=4, concurrency=1, max_retries=2)
        assert (summary.written, summary.failed, summary.complete) == (2, 2, False)
        assert [e["step"] for e in app.log if keys[e["key"]] == 0] == ["500"] * 3  # 1 try + 2 retries
        # The rerun picks up exactly the two failed items (now the server is healthy for them).
        app.script = lambda key: []
        again = _run(load_spec("urban_density"), tmp_path / "out.jsonl", url, count=4, concurrency=1)
    assert (again.written, again.already_done, again.complete) == (2, 2, True)
    assert sorted(r["index"] for r in _lines(tmp_path / "out.jsonl")) == [0, 1, 2, 3]


def test_non_retryable_error_message_is_redacted(monkeypatch):
    monkeypatch.setenv("DOCMIX_TEST_SECRET", "sk-unit-0123456789")
    app = FlakyApp(lambda key: ["echo400"])
    with serve(app) as url:
        async def once():
            config = ClientConfig(base_url=url, model="m", api_key_env="DOCMIX_TEST_SECRET", timeout_s=2)
            async with ChatClient(config) as client:
                await client.complete([{"role": "user", "content": "hi"}], max_tokens=5, label="x")
        with pytest.raises(LLMError) as err:
            asyncio.run(once())
    assert app.log[0]["auth"] == "Bearer sk-unit-0123456789"
    assert "sk-unit-0123456789" not in str(err.value) and "Bearer ***" in str(err.value)


def test_token_budget_stops_and_resume_finishes(tmp_path):
    spec = load_spec("animal_welfare").with_overrides(target_tokens=200)
    # A request reserves its prompt estimate + max_tokens (300) up front; the fake server then reports 170 used.
    estimates = [sum(approx_tokens(m["content"]) for m in write_messages(spec, assign(spec, 0, i), 150)) + 300
                 for i in range(6)]
    budget = 2 * 170 + min(estimates) - 1  # affords items 0 and 1, not item 2
    app = FlakyApp()
    with serve(app) as url:
        first = _run(spec, tmp_path / "o.jsonl", url, count=6, concurrency=1, token_budget=budget)
        assert first.written == 2 and first.not_started == 4 and not first.complete
        assert first.tokens_used == 2 * 170
        second = _run(spec, tmp_path / "o.jsonl", url, count=6, concurrency=2)
    assert (second.already_done, second.written, second.complete) == (2, 4, True)
    assert len(app.log) == 6  # no item was ever requested twice
    assert sorted(r["index"] for r in _lines(tmp_path / "o.jsonl")) == list(range(6))


def test_concurrency_is_bounded(tmp_path):
    app = FlakyApp(delay_s=0.3)
    with serve(app) as url:
        summary = _run(load_spec("animal_welfare"), tmp_path / "o.jsonl", url, count=8, concurrency=3)
    assert summary.written == 8 and app.max_in_flight == 3


def test_store_repairs_a_partial_last_line_and_refuses_corruption(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')
    store = JsonlStore(path)
    assert list(store.records) == ["a"] and store.repaired_bytes == len('{"id": "b", "te')
    store.add({"id": "b", "text": "y"})
    with pytest.raises(StoreError, match="already stored"):
        store.add({"id": "a", "text": "z"})
    store.close()
    assert [r["id"] for r in _lines(path)] == ["a", "b"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(StoreError, match=r"s.jsonl:2: invalid JSON"):
        JsonlStore(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(StoreError, match=r"s.jsonl:2: duplicate id 'a'"):
        JsonlStore(path)


def test_rerun_with_other_settings_is_refused(tmp_path):
    with serve(FlakyApp()) as url:
        _run(load_spec("animal_welfare"), tmp_path / "o.jsonl", url, count=2)
        with pytest.raises(ValueError, match="different settings.*model"):
            _run(load_spec("animal_welfare"), tmp_path / "o.jsonl", url, count=2, model="other")


def test_sdf_mode_brainstorms_once_per_batch_and_revises(tmp_path):
    app = FlakyApp()
    with serve(app) as url:
        summary = _run(load_spec("animal_welfare_ai"), tmp_path / "o.jsonl", url, count=10, mode="sdf", revise=True,
                       ideas_per_call=3, concurrency=4)
    assert summary.written == 10
    records = _lines(tmp_path / "o.jsonl")
    ideas = _lines(tmp_path / "o.jsonl.ideas.jsonl")
    # One brainstorm per (document type, batch of 3 items of that type), no more.
    per_type = {}
    for r in records:
        per_type[r["axes"]["document_type"]] = per_type.get(r["axes"]["document_type"], 0) + 1
    assert len(ideas) == sum((n + 2) // 3 for n in per_type.values())
    assert sum(e["body"]["messages"][-1]["content"].startswith("Brainstorm") for e in app.log) == len(ideas)
    for r in records:
        assert r["idea"].startswith("A premise about case") and r["revised"] and r["critique"] and r["draft"]
        assert r["generator"] == "sdf:fake" and r["ai_identity"] is True
    # Each write prompt carries its premise, and the AI-identity framing of the spec.
    writes = [e["body"]["messages"][-1]["content"] for e in app.log if e["body"]["messages"][-1]["content"].startswith("Write")]
    assert len(writes) == 10 and all("Premise of this document: A premise" in w and "helpful, harmless and honest" in w
                                     for w in writes)
    assert len({r["idea"] for r in records}) == 10


def _generate_cmd(url, out, *extra):
    return [sys.executable, "-m", "data.synth", "generate", "--spec", "animal_welfare", "--model", "fake",
            "--base-url", url, "--out", str(out), "--seed", "1", "--timestamp", STAMP, "--backoff", "0.01",
            "--timeout", "5", *extra]


def test_killed_generator_subprocess_resumes_exactly_once(tmp_path):
    out = tmp_path / "o.jsonl"
    app = FlakyApp(delay_s=0.3)   # 16 items take 2.4 s: time to see 4 done and kill before all are
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with serve(app) as url:
        proc = subprocess.Popen(_generate_cmd(url, out, "--count", "16", "--concurrency", "2"), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_at_kill = out.read_text().count("\n")
        assert 4 <= done_at_kill < 16
        rerun = subprocess.run(_generate_cmd(url, out, "--count", "16", "--concurrency", "2"), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - done_at_kill} written, {done_at_kill} already done, 0 failed" in rerun.stdout
    records = _lines(out)
    assert sorted(r["index"] for r in records) == list(range(16)) and len({r["id"] for r in records}) == 16
    assert all(r["seed"] == 1 and r["created"] == STAMP for r in records)


def test_api_key_from_env_never_appears_in_outputs_or_logs(tmp_path):
    secret = "sk-docmix-test-" + os.urandom(8).hex()
    keys: dict[str, int] = {}

    def script(key):
        keys.setdefault(key, len(keys))
        return ["echo400"] if keys[key] == 0 else ["500"] if keys[key] == 1 else []

    app = FlakyApp(script)
    out, log = tmp_path / "o.jsonl", tmp_path / "gen.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MY_PROVIDER_KEY": secret}
    with serve(app) as url:
        proc = subprocess.run(_generate_cmd(url, out, "--count", "4", "--concurrency", "1", "--api-key-env",
                                            "MY_PROVIDER_KEY", "--log", str(log), "--mode", "sdf",
                                            "--ideas-per-call", "2"),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert {e["auth"] for e in app.log} == {f"Bearer {secret}"}  # the key was used...
    # The echo400 item failed for good: one line, exit 1.
    assert proc.returncode == 1 and f"python -m data.synth: error: {out}: incomplete (1 failed, 0 not started)" \
        in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    everything = proc.stdout + proc.stderr + "".join(p.read_text() for p in tmp_path.iterdir())
    assert secret not in everything  # ...and appears nowhere we wrote
    assert "Bearer ***" in log.read_text() and "HTTP 400" in log.read_text()
    assert "MY_PROVIDER_KEY" not in out.read_text()


def test_no_server_at_the_url_stops_early_naming_it(tmp_path):
    """Nothing listens on the port: the run stops after the first few connection failures (not 7 tries x every
    item), exits 3 (exit_codes: service unreachable) and names the URL once in one line."""
    import socket

    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(_generate_cmd(url, tmp_path / "o.jsonl", "--count", "200", "--concurrency", "2",
                                        "--backoff", "0.01"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m data.synth: error: cannot connect to " + url), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("connection error") <= 5
