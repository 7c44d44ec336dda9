"""An OpenAI-compatible chat-completions server over the KV-cached sampler, for Inspect and the document generator.

    python -m eval.serve --model PATH [--host 127.0.0.1] [--port 8000] [--max_batch 8]

Serves `GET /v1/models`, `GET /health` and `POST /v1/chat/completions` (messages rendered with the checkpoint's chat
template; `max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`, `n`, `stream`; no tools).
Built on Starlette + uvicorn (HTTP parsing, keep-alive and connection timeouts are theirs). With `stream: true` the
answer comes as server-sent events (`chat.completion.chunk` objects, then `data: [DONE]`); the batched sampler
produces whole completions, so the chunks (one per token) are sent once a completion is done. Concurrent requests are
batched. A request must name the served model (`--name`, default the folder's name; another name is a 404 naming it,
as OpenAI answers). A request body over 1 MB is refused (413); a request waits at most `--request_timeout` seconds
for its completion (504). If DOCMIX_API_KEY is set in the server's environment, requests must send it as a Bearer token.
Prints `serving http://HOST:PORT/v1` once the model is loaded and the port is listening.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from eval import generate
from eval.batching import Batcher
from eval.sampling import SamplingParams

API_KEY_ENV = "DOCMIX_API_KEY"


class RequestError(ValueError):
    """A client error, reported as an OpenAI-style error object with the offending parameter: a 400, or `status`
    with OpenAI's `code` (a model this server does not serve: 404, "model_not_found")."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


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
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("'stream' must be true or false", "stream")
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


MAX_BODY_BYTES = 1 << 20


class Service:
    """The server's state and its answers as plain dicts (the HTTP layer is `app()`)."""

    def __init__(self, generator: generate.Generator, *, max_batch: int = 8, default_max_tokens: int = 512,
                 api_key: str | None = None, request_timeout_s: float = 600.0):
        self.generator = generator
        self.batcher = Batcher(generator.generate_ids, max_batch=max_batch)
        self.default_max_tokens = default_max_tokens
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())

    def close(self) -> None:
        self.batcher.close()

    def authorized(self, header: str) -> bool:
        if self.api_key is None:
            return True
        return hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), self.api_key.encode())

    def prompt(self, body: Mapping[str, Any]) -> tuple[list[int], list[SamplingParams]]:
        """The prompt's token ids and each choice's sampling parameters; RequestError names what is wrong. The
        request must name the served model, as OpenAI's API requires (a 404 names the one served)."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(f"the request names no model: this server serves {self.generator.name!r}", "model")
        if model != self.generator.name:
            raise RequestError(f"the model {model!r} does not exist: this server serves {self.generator.name!r}",
                               "model", status=404, code="model_not_found")
        messages = parse_messages(body)
        params, _ = parse_sampling(body, self.default_max_tokens)
        try:
            prompt = self.generator.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise RequestError(str(e), "messages") from e
        limit = self.generator.model.config.max_position_embeddings
        if len(prompt) >= limit:
            raise RequestError(f"the prompt is {len(prompt)} tokens; the model's context is {limit} tokens",
                               "messages")
        if len(prompt) + params[0].max_new_tokens > limit:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({params[0].max_new_tokens}) exceeds the "
                               f"model's context of {limit} tokens", "max_tokens")
        return prompt, params

    async def complete(self, prompt: list[int], params: list[SamplingParams]) -> list[Any]:
        futures = [asyncio.wrap_future(self.batcher.submit(prompt, p)) for p in params]
        return await asyncio.wait_for(asyncio.gather(*futures), self.request_timeout_s)

    def completion(self, prompt: list[int], completions: list[Any]) -> dict[str, Any]:
        used = sum(len(c.token_ids) for c in completions)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.generator.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                         "logprobs": None} for i, c in enumerate(completions)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": used, "total_tokens": len(prompt) + used},
        }

    def chunks(self, completion: Mapping[str, Any], completions: list[Any]) -> list[dict[str, Any]]:
        """The completion as `chat.completion.chunk` objects: a role delta, one content delta per token, a finish."""
        def chunk(index: int, delta: dict, finish: str | None = None) -> dict[str, Any]:
            return {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
                    "model": completion["model"],
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        out = []
        for i, c in enumerate(completions):
            out.append(chunk(i, {"role": "assistant", "content": ""}))
            previous = ""
            for n in range(1, len(c.token_ids) + 1):  # decoded prefixes: multi-token characters arrive whole
                text = self.generator.tokenizer.decode(c.token_ids[:n])
                if text.startswith(previous) and len(text) > len(previous) and len(text) <= len(c.text):
                    out.append(chunk(i, {"content": text[len(previous):]}))
                    previous = text
            if previous != c.text:  # stop strings trimmed the end: send the rest as it was returned
                out.append(chunk(i, {"content": c.text[len(previous):]} if c.text.startswith(previous) else
                                 {"content": c.text}))
            out.append(chunk(i, {}, c.finish_reason))
        out[-1]["usage"] = completion["usage"]
        return out

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.generator.name, "object": "model", "created": self.created,
                                            "owned_by": "docmix"}]}


def app(service: Service):
    """The Starlette application: routes, auth, body limits and OpenAI-style error objects."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    def refused(request: Request) -> JSONResponse | None:
        if service.authorized(request.headers.get("authorization", "")):
            return None
        return error(401, "invalid API key", "authentication_error")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "batches": service.batcher.batches, "requests": service.batcher.requests})

    async def models(request: Request) -> JSONResponse:
        return refused(request) or JSONResponse(service.models())

    async def chat(request: Request):
        if (bad := refused(request)) is not None:
            return bad
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error(413 if length.isdigit() else 400, f"Content-Length {length!r}: expected a size of at most "
                         f"{MAX_BODY_BYTES} bytes", "invalid_request_error")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                return error(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error")
        try:
            body = json.loads(raw or b"null")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            prompt, params = service.prompt(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"invalid JSON body: {e}", "invalid_request_error")
        except RequestError as e:
            return error(e.status, str(e), "invalid_request_error", e.param, e.code)
        try:
            completions = await service.complete(prompt, params)
        except asyncio.TimeoutError:
            return error(504, f"no completion within {service.request_timeout_s:g} s", "timeout_error")
        except Exception as e:  # a failure inside generation: report it to the client, keep serving
            return error(500, f"{type(e).__name__}: {e}", "server_error")
        completion = service.completion(prompt, completions)
        if not body.get("stream"):
            return JSONResponse(completion)

        async def events() -> AsyncIterator[str]:
            for chunk in service.chunks(completion, completions):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error(404, f"no route {request.method} {request.url.path}", "not_found_error")

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/chat/completions", chat,
                                                                          methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def serve(service: Service, host: str, port: int, *, timeout_keep_alive: int = 5) -> None:
    """Binds and listens first (so the printed URL is ready), then runs uvicorn until interrupted."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(app(service), log_level="warning", timeout_keep_alive=timeout_keep_alive,
                            h11_max_incomplete_event_size=64 * 1024)
    print(f"serving http://{bound_host}:{bound_port}/v1", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        service.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder, run directory or checkpoint step directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--name", help="model id served at /v1/models (default: the folder's name)")
    parser.add_argument("--max_batch", type=int, default=8)
    parser.add_argument("--default_max_tokens", type=int, default=512, help="when a request sets no max_tokens")
    parser.add_argument("--request_timeout", type=float, default=600.0,
                        help="seconds a request may wait for its completion (then 504)")
    args = parser.parse_args(argv)
    generator = generate.load(args.model)
    if args.name:
        generator = generate.Generator(generator.model, generator.tokenizer, args.name)
    service = Service(generator, max_batch=args.max_batch, default_max_tokens=args.default_max_tokens,
                      api_key=os.environ.get(API_KEY_ENV) or None, request_timeout_s=args.request_timeout)
    serve(service, args.host, args.port)


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m eval.serve"))
