"""A small async client for OpenAI-compatible chat completions (hosted APIs, vLLM, any `/v1/chat/completions`).

Retries with exponential backoff (and jitter) on 429 (honouring Retry-After, seconds or HTTP date), 408/409, 5xx,
timeouts, connection errors and unparseable or truncated JSON bodies; 401/403 (the server refuses this client) and
no server at the URL stop the whole run (ServerRefused, ServerUnreachable); other 4xx fail the request. The API key
is read from an environment variable whose *name* is configured, sent only in the Authorization header, and scrubbed
from every message this module logs or raises (a server that echoes the header back cannot leak it through us).
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import os
import random
import time
from typing import Any

import httpx

log = logging.getLogger("data.synth.llm")
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
REFUSED_STATUS = frozenset({401, 403})


class LLMError(RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted); the message never holds the key."""


class ServerUnreachable(ConnectionError):
    """No server answers at the URL: the first `ClientConfig.unreachable_after` attempts, or every attempt of a
    request, failed to connect (the message names the URL). Generation stops instead of retrying every item; exit 3
    (exit_codes)."""


class ServerRefused(ConnectionError):
    """The server refuses this client (HTTP 401 or 403: a missing, wrong or unauthorised API key), so it would refuse
    every request: generation stops at the first refusal; exit 3 (exit_codes)."""


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var holding the key; None or unset: no auth header
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 120.0
    unreachable_after: int = 5   # connection failures before any answer that mean "no server at this URL"


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date; None if absent/garbled."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class ChatClient:
    """`await client.complete(messages, max_tokens=..., temperature=..., seed=...)`; use as an async context."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self._key = os.environ.get(config.api_key_env) if config.api_key_env else None
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._answered = False      # any HTTP response yet: a server exists at the URL
        self._connect_failures = 0  # connection failures before the first response
        self._http = httpx.AsyncClient(base_url=config.base_url.rstrip("/") + "/", headers=headers,
                                       timeout=httpx.Timeout(config.timeout_s))

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _backoff(self, attempt: int) -> float:
        delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** attempt)
        return delay * (0.5 + random.random() / 2)  # jitter keeps concurrent workers from retrying in lockstep

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 1.0,
                       seed: int | None = None, label: str = "") -> Completion:
        payload: dict[str, Any] = {"model": self.config.model, "messages": messages, "max_tokens": max_tokens,
                                   "temperature": temperature}
        if seed is not None:
            payload["seed"] = seed
        last = ""
        for attempt in range(self.config.max_retries + 1):
            wait = None
            try:
                response = await self._http.post("chat/completions", json=payload)
            except httpx.TimeoutException:
                last = "timeout"
            except httpx.TransportError as err:
                last = f"connection error ({type(err).__name__})"
                if not self._answered:
                    self._connect_failures += 1
                    if self._connect_failures >= self.config.unreachable_after:
                        raise ServerUnreachable(
                            f"cannot connect to {self.config.base_url}: the first {self._connect_failures} attempts "
                            f"all failed ({type(err).__name__}); is the server running and --base-url right?"
                        ) from None
            else:
                self._answered = True
                if response.status_code == 200:
                    try:
                        return _parse(response.text, attempt + 1)
                    except ValueError as err:
                        last = f"bad response body ({err})"
                elif response.status_code in RETRY_STATUS:
                    last = f"HTTP {response.status_code}"
                    if response.status_code == 429:
                        wait = retry_after_seconds(response.headers.get("retry-after"))
                        if wait is not None:
                            wait = min(wait, self.config.retry_after_max_s)
                elif response.status_code in REFUSED_STATUS:
                    raise ServerRefused(self.redact(
                        f"HTTP {response.status_code} from {self.config.base_url} ({label}): the server refuses this "
                        f"client; {self._key_note()}: {response.text[:300]}"))
                else:
                    raise LLMError(self.redact(f"{label}: HTTP {response.status_code} from {self.config.base_url}: "
                                               f"{response.text[:300]}"))
            if attempt == self.config.max_retries:
                break
            wait = self._backoff(attempt) if wait is None else wait
            log.warning(self.redact(f"{label}: {last}; retry {attempt + 1}/{self.config.max_retries} in {wait:.2f}s"))
            await asyncio.sleep(wait)
        if not self._answered and last.startswith("connection error"):
            raise ServerUnreachable(f"cannot connect to {self.config.base_url}: all {self.config.max_retries + 1} "
                                    f"attempts of {label} failed ({last}); is the server running and --base-url right?")
        raise LLMError(self.redact(f"{label}: gave up after {self.config.max_retries + 1} attempts to "
                                   f"{self.config.base_url} (last: {last})"))

    def _key_note(self) -> str:
        env = self.config.api_key_env
        if not env:
            return "no API key was sent (--api-key-env is empty)"
        return f"the API key in ${env} was sent" if self._key else f"no API key was sent (${env} is not set)"


def _parse(body: str, attempts: int) -> Completion:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg}; char {err.pos} of {len(body)})") from None
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if not isinstance(text, str):
        raise ValueError("choices[0].message.content is not a string")
    usage = data.get("usage") or {}
    return Completion(text, choice.get("finish_reason"), int(usage.get("prompt_tokens") or 0),
                      int(usage.get("completion_tokens") or 0), attempts)
