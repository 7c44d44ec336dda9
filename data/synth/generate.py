"""LLM generation of a spec's corpus through an OpenAI-compatible endpoint: resumable, bounded, budgeted.

Item `index` gets its axes from `assign` (so a run's combinations are fixed by the seed), a deterministic id, and a
per-item request seed. Modes:
- `direct`: one request writes the document from the spec and the axes.
- `sdf`: brainstorm premises per document type (cached in `<out>.ideas.jsonl`, one call per batch of
  `ideas_per_call`), write each document from its premise, then optionally critique and revise it.
Finished items are appended to `out` one line at a time (see store.py); a rerun skips them. The run's identity
(spec hash, seed, model, mode, revise) is kept in `<out>.run.json`, and a rerun with different settings is refused.
A token budget (prompt + completion tokens as the server reports them, reserved up front from the request's
`max_tokens` and an estimate of the prompt) stops the run from starting requests it could not afford.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import pathlib
import time
from collections import defaultdict
from typing import Any

from tqdm import tqdm

from data.synth import prompts
from data.synth.assign import assign, item_id
from data.synth.llm import ChatClient, ClientConfig, Completion, LLMError
from data.synth.records import approx_tokens, make_record, timestamp
from data.synth.spec import Spec
from data.synth.store import JsonlStore

log = logging.getLogger("data.synth.generate")
MODES = ("direct", "sdf")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    out: pathlib.Path
    count: int
    seed: int
    mode: str = "direct"
    revise: bool = False
    max_tokens: int | None = None  # per document request; default 1.5x the spec's target tokens
    temperature: float = 1.0
    concurrency: int = 4
    token_budget: int | None = None
    ideas_per_call: int = 10
    created: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.revise and self.mode != "sdf":
            raise ValueError("revise (critique-and-revise) belongs to mode 'sdf'")
        for name in ("count", "concurrency", "ideas_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    requested: int
    already_done: int
    written: int
    failed: int
    not_started: int  # left for a later run because the token budget ran out
    truncated: int  # written documents whose completion stopped at max_tokens (finish_reason "length")
    tokens_used: int
    elapsed_s: float

    @property
    def complete(self) -> bool:
        return self.already_done + self.written == self.requested


class BudgetExhausted(Exception):
    pass


class _Budget:
    def __init__(self, limit: int | None):
        self.limit, self.used, self.reserved = limit, 0, 0

    def reserve(self, n: int) -> None:
        if self.limit is not None and self.used + self.reserved + n > self.limit:
            raise BudgetExhausted
        self.reserved += n

    def settle(self, reserved: int, actual: int) -> None:
        self.reserved -= reserved
        self.used += actual


class _Run:
    def __init__(self, spec: Spec, config: GenerateConfig, client: ChatClient, model: str):
        self.spec, self.config, self.client, self.model = spec, config, client, model
        self.budget = _Budget(config.token_budget)
        self.store = JsonlStore(config.out)
        ideas_path = config.out.with_name(config.out.name + ".ideas.jsonl")
        self.ideas = JsonlStore(ideas_path) if config.mode == "sdf" else None
        self.idea_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.max_tokens = config.max_tokens or int(spec.target_tokens * 1.5)
        self.target_words = max(50, int(spec.target_tokens * 0.75))
        self.created = timestamp(config.created)
        self.stop = False
        # The rank of each item among items of its document type picks its premise in sdf mode.
        self.axes = [assign(spec, config.seed, i) for i in range(config.count)]
        seen: dict[str, int] = defaultdict(int)
        self.rank = []
        for axes in self.axes:
            self.rank.append(seen[axes["document_type"]])
            seen[axes["document_type"]] += 1

    async def call(self, messages: list[dict], max_tokens: int, seed: int, label: str) -> Completion:
        if self.stop:
            raise BudgetExhausted
        estimate = sum(approx_tokens(m["content"]) for m in messages) + max_tokens
        try:
            self.budget.reserve(estimate)
        except BudgetExhausted:
            self.stop = True
            raise
        used = 0
        try:
            result = await self.client.complete(messages, max_tokens=max_tokens, temperature=self.config.temperature,
                                                seed=seed, label=label)
            used = result.prompt_tokens + result.completion_tokens or approx_tokens(result.text)
            return result
        finally:
            self.budget.settle(estimate, used)

    async def idea(self, index: int) -> str:
        doc_type = self.axes[index]["document_type"]
        batch, offset = divmod(self.rank[index], self.config.ideas_per_call)
        key = f"{doc_type}#{batch}"
        async with self.idea_locks[key]:
            if key not in self.ideas:
                messages = prompts.brainstorm_messages(self.spec, doc_type, self.config.ideas_per_call, batch)
                seed = _seed(self.spec, self.config.seed, key)
                result = await self.call(messages, 60 * self.config.ideas_per_call, seed, f"brainstorm {key}")
                ideas = prompts.parse_ideas(result.text)
                if not ideas:
                    raise LLMError(f"brainstorm {key}: no premises could be parsed from the reply")
                self.ideas.add({"id": key, "document_type": doc_type, "batch": batch, "ideas": ideas,
                                "spec_hash": self.spec.hash, "model": self.model, "created": self.created})
        ideas = self.ideas.records[key]["ideas"]
        return ideas[offset % len(ideas)]

    async def item(self, index: int) -> dict[str, Any]:
        spec, axes, seed = self.spec, self.axes[index], _seed(self.spec, self.config.seed, index)
        label = item_id(spec, self.config.seed, index)
        extra: dict[str, Any] = {}
        if self.config.mode == "sdf":
            extra["idea"] = await self.idea(index)
        result = await self.call(prompts.write_messages(spec, axes, self.target_words, extra.get("idea")),
                                 self.max_tokens, seed, label)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        text, finish = result.text.strip(), result.finish_reason
        if self.config.revise:
            critique = await self.call(prompts.critique_messages(text, axes["document_type"]), 400, seed + 1,
                                       f"{label} critique")
            revised = await self.call(prompts.revise_messages(text, critique.text, axes["document_type"],
                                                              self.target_words), self.max_tokens, seed + 2,
                                      f"{label} revise")
            extra.update(draft=text, critique=critique.text.strip())
            text, finish = revised.text.strip(), revised.finish_reason
            for r in (critique, revised):
                usage = {"prompt_tokens": usage["prompt_tokens"] + r.prompt_tokens,
                         "completion_tokens": usage["completion_tokens"] + r.completion_tokens}
        return make_record(spec, self.config.seed, index, axes, generator=f"{self.config.mode}:{self.model}",
                           created=self.created, text=text, mode=self.config.mode, revised=self.config.revise,
                           finish_reason=finish, usage=usage, attempts=result.attempts, **extra)


def _seed(spec: Spec, seed: int, key: object) -> int:
    return int.from_bytes(hashlib.sha256(f"{spec.hash}\x1f{seed}\x1f{key}".encode()).digest()[:4], "big") >> 1


def _check_run_file(config: GenerateConfig, identity: dict[str, Any]) -> None:
    path = config.out.with_name(config.out.name + ".run.json")
    if path.exists():
        previous = json.loads(path.read_text())
        diff = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
        if diff:
            raise ValueError(f"{config.out} was started with different settings {diff} (old, new); use a new --out "
                             f"or the original settings")
    else:
        config.out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2) + "\n")


async def generate(spec: Spec, config: GenerateConfig, client_config: ClientConfig, progress: bool = True
                   ) -> RunSummary:
    """Generates the missing items 0..count-1 of `config.out`; see the module docstring."""
    start = time.monotonic()
    _check_run_file(config, {"spec": spec.name, "spec_hash": spec.hash, "seed": config.seed,
                             "model": client_config.model, "mode": config.mode, "revise": config.revise})
    async with ChatClient(client_config) as client:
        run = _Run(spec, config, client, client_config.model)
        ids = [item_id(spec, config.seed, i) for i in range(config.count)]
        pending = [i for i, key in enumerate(ids) if key not in run.store]
        done_before = config.count - len(pending)
        log.info(f"{config.out}: {done_before} of {config.count} items already done, {len(pending)} to generate")
        gate = asyncio.Semaphore(config.concurrency)
        counts = {"written": 0, "failed": 0, "not_started": 0, "truncated": 0}
        bar = tqdm(total=len(pending), desc="generate", unit="doc", disable=not progress or None)

        async def work(index: int) -> None:
            async with gate:
                try:
                    record = await run.item(index)
                except BudgetExhausted:
                    counts["not_started"] += 1
                    return
                except LLMError as err:
                    counts["failed"] += 1
                    message = str(err)  # names the item already unless a shared brainstorm call failed
                    log.error(message if message.startswith(ids[index]) else f"{ids[index]}: {message}")
                    return
                run.store.add(record)
                counts["written"] += 1
                counts["truncated"] += record["finish_reason"] == "length"
                bar.update(1)

        try:
            await asyncio.gather(*(work(i) for i in pending))
        finally:
            bar.close()
            run.store.close()
            if run.ideas is not None:
                run.ideas.close()
    if run.stop:
        log.warning(f"token budget {config.token_budget} reached: {counts['not_started']} items left for a later run")
    return RunSummary(config.count, done_before, counts["written"], counts["failed"], counts["not_started"],
                      counts["truncated"], run.budget.used, round(time.monotonic() - start, 2))
