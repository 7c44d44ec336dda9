"""Test-only OpenAI-compatible chat-completions servers on 127.0.0.1 (real HTTP, stdlib http.server in a thread).

- `FlakyApp`: scripted failures per request (429 with Retry-After, 500, a stall past the client's timeout,
  truncated JSON, a 400 that echoes the Authorization header) before a canned answer; it records every request.
- `TransformersApp`: serves a real Hugging Face causal LM (SmolLM2-135M-Instruct in the tests) with greedy decoding.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading
import time
from typing import Callable, Iterator


def completion_body(text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str = "stop") -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.reply(404, b'{"error": "not found"}')
        self.server.app(self, body)

    def reply(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(app: Callable) -> Iterator[str]:
    """Runs `app(handler, body)` behind a threaded HTTP server; yields the base URL (`http://127.0.0.1:PORT/v1`)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.app = app
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def request_key(body: dict) -> str:
    """Identifies a logical request across retries: a hash of its messages."""
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:12]


class FlakyApp:
    """Answers request k's n-th attempt with `script(key)[n]` until the script runs out, then succeeds.

    Steps: "429" (Retry-After from `retry_after`), "500", "stall" (sleeps `stall_s`, longer than the client timeout),
    "truncated" (a 200 whose JSON is cut off), "echo400" (a 400 whose body echoes the Authorization header), "401"
    (the key is refused, as OpenAI answers a wrong one).
    `delay_s` delays every successful answer (to kill a client mid-run).
    """

    def __init__(self, script: Callable[[str], list[str]] = lambda key: [], retry_after: str = "0",
                 stall_s: float = 1.0, delay_s: float = 0.0):
        self.script, self.retry_after, self.stall_s, self.delay_s = script, retry_after, stall_s, delay_s
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.log: list[dict] = []  # {key, step, time, auth, body}
        self.in_flight = self.max_in_flight = 0

    def __call__(self, handler: _Handler, body: dict) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._respond(handler, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _respond(self, handler: _Handler, body: dict) -> None:
        key = request_key(body)
        with self.lock:
            n = self.attempts.get(key, 0)
            self.attempts[key] = n + 1
            steps = self.script(key)
            step = steps[n] if n < len(steps) else "ok"
            self.log.append({"key": key, "step": step, "time": time.monotonic(),
                             "auth": handler.headers.get("Authorization"), "body": body})
        if step == "429":
            return handler.reply(429, b'{"error": "rate limited"}', {"Retry-After": self.retry_after})
        if step == "500":
            return handler.reply(500, b'{"error": "internal"}')
        if step == "401":
            return handler.reply(401, b'{"error": {"message": "Incorrect API key provided", '
                                      b'"code": "invalid_api_key"}}')
        if step == "stall":
            time.sleep(self.stall_s)
        if step == "truncated":
            full = json.dumps(completion_body("cut", 10, 1)).encode()
            return handler.reply(200, full[: len(full) // 2])
        if step == "echo400":
            return handler.reply(400, json.dumps({"error": f"bad auth {handler.headers.get('Authorization')}"}).encode())
        time.sleep(self.delay_s)
        handler.reply(200, json.dumps(completion_body(self.answer(body), 50, 120)).encode())

    @staticmethod
    def answer(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Brainstorm"):
            n = int(prompt.split()[1])
            return "\n".join(f"{i}. A premise about case {i} of {request_key(body)[:6]} in plain words." for i in range(1, n + 1))
        if "Be brief." in prompt:
            return "1. Add figures. 2. Name the site. 3. Trim the opening."
        header = prompt.split("Issuing institution: ")[-1].split("\n")[0]
        return (f"MEMORANDUM\n{header}\n\n" + f"Request {request_key(body)} reviewed the programme and its results "
                "across several sites, with figures for each quarter and notes from staff. " * 6).strip()


class TransformersApp:
    """Greedy chat completion with a real transformers model; one request at a time (CPU)."""

    def __init__(self, model_dir, max_new_tokens_cap: int = 64):
        import torch
        import transformers
        self.torch = torch
        torch.set_num_threads(1)  # on a shared 2-core CI box, intra-op threads contend and run several times slower
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.cap = max_new_tokens_cap
        self.lock = threading.Lock()
        self.requests: list[dict] = []

    def __call__(self, handler: _Handler, body: dict) -> None:
        max_new = min(int(body.get("max_tokens") or self.cap), self.cap)
        with self.lock, self.torch.no_grad():
            ids = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"]
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
            new = out[0, ids.shape[1]:].tolist()
            self.requests.append({"prompt_tokens": ids.shape[1], "completion_tokens": len(new), "body": body})
        finished = bool(new) and new[-1] == self.tokenizer.eos_token_id
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        payload = completion_body(text, ids.shape[1], len(new), "stop" if finished else "length")
        handler.reply(200, json.dumps(payload).encode())
