"""Gathers concurrent generation requests into batches for one worker thread (the only thread that calls JAX).

Inspect and the document generator send many requests at once; generating them together costs little more than one.
A request waits at most `wait_s` for companions; batches are padded up to a power of two (with one-token copies of
the first row) so that only a few batch shapes are ever compiled.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable, Sequence

from eval.generate import Completion
from eval.sampling import SamplingParams

GenerateFn = Callable[[Sequence[Sequence[int]], Sequence[SamplingParams]], list[Completion]]


@dataclasses.dataclass(frozen=True)
class _Request:
    prompt: tuple[int, ...]
    params: SamplingParams
    future: concurrent.futures.Future


def padded_size(n: int, max_batch: int) -> int:
    """The next power of two >= n, capped at max_batch."""
    size = 1
    while size < n:
        size *= 2
    return min(size, max_batch)


class Batcher:
    def __init__(self, generate_fn: GenerateFn, *, max_batch: int = 8, wait_s: float = 0.02):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._generate = generate_fn
        self._max_batch = max_batch
        self._wait_s = wait_s
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self.batches = 0  # counters for /health: how well requests are being batched
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="docmix-generate", daemon=True)
        self._thread.start()

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Request(tuple(prompt), params, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, closing = [first], False
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get(timeout=self._wait_s)
            except queue.Empty:
                break
            if item is None:
                closing = True
                break
            batch.append(item)
        return batch, closing

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, closing = self._collect(first)
            filler = padded_size(len(batch), self._max_batch) - len(batch)
            prompts = [r.prompt for r in batch] + [batch[0].prompt] * filler
            params = [r.params for r in batch] + [SamplingParams(max_new_tokens=1)] * filler
            self.batches += 1
            self.requests += len(batch)
            try:
                completions = self._generate(prompts, params)
            except Exception as e:  # the error belongs to the requests, the worker carries on
                for r in batch:
                    r.future.set_exception(e)
            else:
                for r, c in zip(batch, completions):
                    r.future.set_result(c)
            if closing:
                return
