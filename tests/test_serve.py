"""The OpenAI-compatible server in a subprocess, answering the `openai` client and Inspect (ANIMA) over HTTP."""
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import json
import time
import urllib.request

import pytest

from tests import extras

pytestmark = extras.require("eval")

import openai  # noqa: E402
from eval import anima  # noqa: E402
from tests.test_anima import check_real_run, one_torch_thread  # noqa: F401 (a fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "test-key-not-secret"  # the server then requires it as the Bearer token


@pytest.fixture(scope="module")
def server_url(smollm2_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", anima.API_KEY_ENV: KEY}
    proc = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", str(smollm2_dir), "--port", "0",
                             "--max_batch", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        line = proc.stdout.readline()
        while not line.startswith("serving ") and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), f"server did not start (exit code {proc.poll()})"
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url, api_key=KEY, max_retries=0, timeout=600)


def _ask(client, messages, **kwargs):
    return client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, **kwargs)


def test_models_and_a_real_chat_request(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    reply = _ask(client, QUESTION, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    # The same text the in-process sampler and transformers give (tests/test_generate.py).
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert reply.usage.prompt_tokens == 37 and reply.usage.completion_tokens == 7
    stopped = _ask(client, QUESTION, max_tokens=24, temperature=0, stop=[" Paris"])
    assert stopped.choices[0].message.content == "The capital of France is"
    two = _ask(client, QUESTION, max_tokens=3, temperature=0, n=2)
    assert [c.finish_reason for c in two.choices] == ["length", "length"]
    assert two.choices[0].message.content == two.choices[1].message.content == "The capital of"


def test_a_wrong_api_key_is_refused(server_url):
    wrong = openai.OpenAI(base_url=server_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def _health(server_url):
    with urllib.request.urlopen(server_url.removesuffix("/v1") + "/health") as r:
        return json.load(r)


def test_concurrent_requests_are_batched_without_changing_answers(client, server_url):
    questions = [[{"role": "user", "content": q}] for q in ("Name a bird.", "What is 2+2?", "Say hello.")]
    alone = [_ask(client, q, max_tokens=12, temperature=0).choices[0].message.content for q in questions]
    before = _health(server_url)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda q: _ask(client, q, max_tokens=12, temperature=0).choices[0].message.content,
                                 questions))
    after = _health(server_url)
    assert together == alone
    assert after["requests"] - before["requests"] == 3 and after["batches"] - before["batches"] < 3


def test_streaming_sends_the_same_answer_as_server_sent_events(client):
    whole = _ask(client, QUESTION, max_tokens=24, temperature=0)
    chunks = list(_ask(client, QUESTION, max_tokens=24, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len(chunks) > 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


def _raw(server_url, request: bytes) -> bytes:
    """Sends raw bytes to the server and returns everything it answers before closing (or 10 s)."""
    import socket

    host, port = server_url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"99999999999"])
def test_malformed_content_length_is_a_400_not_a_hang(server_url, length):
    body = json.dumps({"model": "m", "messages": QUESTION}).encode()
    answer = _raw(server_url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n" + body)
    status = answer.split(b"\r\n", 1)[0]
    assert status.split()[1] in (b"400", b"413"), answer[:300]


def test_a_model_it_does_not_serve_is_a_404_naming_the_served_one(client):
    """As OpenAI answers: a 404 with the code model_not_found, whatever the messages."""
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4o' does not exist: this server serves "
                                                   "'smollm2-135m-instruct'") as err:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert (err.value.code, err.value.param) == ("model_not_found", "model")


def test_a_long_prompt_is_refused_naming_its_length(client):
    with pytest.raises(openai.BadRequestError, match=r"the prompt is \d+ tokens; the model's context is 8192") as err:
        _ask(client, [{"role": "user", "content": "cat " * 100_000}], max_tokens=4)
    assert "max_tokens" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stream="yes"), "'stream' must be true or false"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(max_tokens=10**7), "exceeds the model's context"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "only text content"),
])
def test_bad_requests_get_400(client, kwargs, match):
    kwargs = {"messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError, match=match):
        _ask(client, **kwargs)


@pytest.mark.slow
def test_anima_through_the_server(server_url, smollm2_dir, anima_dir, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv(anima.API_KEY_ENV, KEY)
    out = tmp_path / "anima.json"
    result = anima.run(server_url, f"hf/{smollm2_dir}", dataset_dir=anima_dir, epochs=1, limit=1, max_tokens=16,
                       grader_max_tokens=16, out=out)
    assert result["inspect_model"] == "openai-api/docmix/smollm2-135m-instruct"
    check_real_run(result, out, n_questions=1)
