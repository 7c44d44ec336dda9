"""An OpenAI-compatible chat-completions server over the KV-cached sampler, for Inspect and the document generator.

    python -m eval.serve --model PATH [--host 127.0.0.1] [--port 8000] [--max_batch 8]

Serves `GET /v1/models` and `POST /v1/chat/completions` (messages rendered with the checkpoint's chat template;
`max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`, `n`; no streaming or tools).
Concurrent requests are batched. If DOCMIX_API_KEY is set in the server's environment, requests must send it as a
Bearer token. Prints `serving http://HOST:PORT/v1` once the model is loaded and the port is bound.
"""
from __future__ import annotations

import argparse
import hmac
import http.server
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from eval import generate
from eval.batching import Batcher
from eval.sampling import SamplingParams

API_KEY_ENV = "DOCMIX_API_KEY"


class RequestError(ValueError):
    """A client error, reported as an OpenAI-style 400 with the offending parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _text_content(content: Any, index: int) -> str:
    """Message content is a string or a list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RequestError(f"messages[{index}]: only text content is supported, got {kind!r}", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", "messages")


def parse_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] needs a string 'role'", "messages")
        if m.get("tool_calls"):
            raise RequestError(f"messages[{i}]: tool calls are not supported", "messages")
        parsed.append({"role": m["role"], "content": _text_content(m.get("content") or "", i)})
    return parsed


def _number(body: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    return kind(value)


def parse_sampling(body: Mapping[str, Any], default_max_tokens: int) -> tuple[list[SamplingParams], int]:
    """SamplingParams for each of the `n` choices (seeds seed, seed+1, ...), and n. OpenAI defaults: temperature 1."""
    if body.get("stream"):
        raise RequestError("streaming is not supported; send stream=false", "stream")
    if body.get("tools"):
        raise RequestError("tools are not supported", "tools")
    max_tokens = _number(body, "max_completion_tokens", int, None)
    max_tokens = _number(body, "max_tokens", int, default_max_tokens) if max_tokens is None else max_tokens
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    n = _number(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise RequestError(f"'n' must be in [1, 16], got {n}", "n")
    seed = _number(body, "seed", int, None)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed % 2**32
    try:
        params = [SamplingParams(max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 1.0),
                                 top_p=_number(body, "top_p", float, 1.0), stop=tuple(s for s in stop if s),
                                 seed=(seed + i) % 2**32) for i in range(n)]
    except ValueError as e:
        raise RequestError(str(e)) from e
    return params, n


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], generator: generate.Generator, *, max_batch: int = 8,
                 default_max_tokens: int = 512, api_key: str | None = None):
        super().__init__(address, Handler)
        self.generator = generator
        self.batcher = Batcher(generator.generate_ids, max_batch=max_batch)
        self.default_max_tokens = default_max_tokens
        self.api_key = api_key
        self.created = int(time.time())

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        messages = parse_messages(body)
        params, n = parse_sampling(body, self.default_max_tokens)
        try:
            prompt = self.generator.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise RequestError(str(e), "messages") from e
        limit = self.generator.model.config.max_position_embeddings
        if len(prompt) + params[0].max_new_tokens > limit:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({params[0].max_new_tokens}) exceeds the "
                               f"model's context of {limit} tokens", "max_tokens")
        completions = [f.result() for f in [self.batcher.submit(prompt, p) for p in params]]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.generator.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                         "logprobs": None} for i, c in enumerate(completions)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": sum(len(c.token_ids) for c in completions),
                      "total_tokens": len(prompt) + sum(len(c.token_ids) for c in completions)},
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.generator.name, "object": "model", "created": self.created,
                                            "owned_by": "docmix"}]}


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _authorized(self) -> bool:
        if self.server.api_key is None:
            return True
        sent = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(sent.encode(), self.server.api_key.encode()):
            return True
        self._error(401, "invalid API key", "authentication_error")
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") in ("/health", ""):
            self._send(200, {"status": "ok", "batches": self.server.batcher.batches,
                             "requests": self.server.batcher.requests})
        elif not self._authorized():
            return
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, self.server.models())
        else:
            self._error(404, f"no route GET {self.path}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route POST {self.path}", "not_found_error")
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            self._send(200, self.server.chat_completion(body))
        except json.JSONDecodeError as e:
            self._error(400, f"invalid JSON body: {e.msg}", "invalid_request_error")
        except RequestError as e:
            self._error(400, str(e), "invalid_request_error", e.param)
        except Exception as e:  # a failure inside generation: report it to the client, keep serving
            self._error(500, f"{type(e).__name__}: {e}", "server_error")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder, run directory or checkpoint step directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--name", help="model id served at /v1/models (default: the folder's name)")
    parser.add_argument("--max_batch", type=int, default=8)
    parser.add_argument("--default_max_tokens", type=int, default=512, help="when a request sets no max_tokens")
    args = parser.parse_args(argv)
    generator = generate.load(args.model)
    if args.name:
        generator = generate.Generator(generator.model, generator.tokenizer, args.name)
    server = Server((args.host, args.port), generator, max_batch=args.max_batch,
                    default_max_tokens=args.default_max_tokens, api_key=os.environ.get(API_KEY_ENV) or None)
    print(f"serving {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m eval.serve"))
