"""Command line for data.synth: one subcommand per step, each with --help, a progress bar and a summary."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Callable, Sequence

from tqdm import tqdm

import storage
import exit_codes
from data.synth.records import approx_tokens, read_jsonl, record_text, timestamp, write_jsonl
from data.synth.spec import bundled_specs, load_spec

_SPEC_HELP = "bundled spec name ({}) or a path to a spec YAML file"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 must not silently mean 'the spec's default')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help=_SPEC_HELP.format(", ".join(bundled_specs())))
    p.add_argument("--count", type=_positive_int, default=None, help="number of items (default: the spec's count)")
    p.add_argument("--seed", type=int, default=None, help="seed for axis assignment and wording (default: the spec's)")
    p.add_argument("--out", required=True, help="output JSONL path (written atomically)")
    p.add_argument("--timestamp", default=None,
                   help="fixed `created` value for byte-identical reruns (default: SOURCE_DATE_EPOCH or now)")


def _progress(items, total: int, desc: str):
    """A progress bar on a terminal for long runs (total 0: unknown length)."""
    return tqdm(items, total=total or None, desc=desc, unit="doc",
                disable=not sys.stderr.isatty() or 0 < total < 200)


def _load(args: argparse.Namespace):
    spec = load_spec(args.spec)
    if getattr(args, "ai_identity", None) is not None:
        spec = spec.with_overrides(ai_identity=args.ai_identity)
    count = spec.count if args.count is None else args.count
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    return spec, count


def _write_counted(path: str, records, count: int, desc: str) -> tuple[int, int]:
    """Writes records with a progress bar; returns (records, approx tokens)."""
    tokens = 0

    def counted():
        nonlocal tokens
        for record in _progress(records, count, desc):
            tokens += approx_tokens(record_text(record))
            yield record

    return write_jsonl(path, counted()), tokens


def cmd_render(args: argparse.Namespace) -> int:
    from data.synth.render import render_records
    spec, count = _load(args)
    records = render_records(spec, count=count, seed=args.seed, target_tokens=args.target_tokens,
                             created=timestamp(args.timestamp))
    written, tokens = _write_counted(args.out, records, count, "render")
    print(f"rendered {written} documents from spec {spec.name} ({spec.hash}), ~{tokens} tokens "
          f"(~{tokens // max(written, 1)} per document) -> {args.out}")
    return 0


def cmd_qa(args: argparse.Namespace) -> int:
    from data.synth.qa import qa_records
    spec, count = _load(args)
    records = qa_records(spec, count=count, seed=args.seed, fmt=args.format, created=timestamp(args.timestamp))
    written, tokens = _write_counted(args.out, records, count, "qa")
    print(f"wrote {written} {args.format} QA pairs from spec {spec.name} ({spec.hash}), ~{tokens} tokens "
          f"(~{tokens // max(written, 1)} per pair) -> {args.out}")
    return 0


def _read(path: str) -> list[dict]:
    return list(read_jsonl(path, require=()))


def cmd_filter(args: argparse.Namespace) -> int:
    from data.synth.filters import FilterConfig, apply_filters
    from data.synth.stats import filter_report_path
    config = FilterConfig(min_tokens=args.min_tokens, max_tokens=args.max_tokens, refusals=args.refusals,
                          dedup=args.dedup, dedup_threshold=args.dedup_threshold, dedup_ngram=args.dedup_ngram)
    records = _read(args.input)
    result = apply_filters(records, config)
    write_jsonl(args.out, result.kept)
    rejects = args.rejects or args.out + ".rejects.jsonl"
    write_jsonl(rejects, result.rejected)
    report = {"input": args.input, "total": result.total, "kept": len(result.kept), "removed": result.removed,
              "config": dataclasses.asdict(config)}
    filter_report_path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    removed = ", ".join(f"{k} {v}" for k, v in result.removed.items())
    print(f"kept {len(result.kept)} of {result.total} records ({removed}) -> {args.out}; rejects -> {rejects}")
    return 0


def cmd_contamination(args: argparse.Namespace) -> int:
    from data.synth.contamination import Index, check_corpus, load_eval_items
    index = Index(load_eval_items(args.eval, args.field), n=args.n, min_words=args.min_words)
    records = _read(args.input)
    report = check_corpus(records, index)
    if args.report:
        storage.Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    for hit in report.hits[:10]:
        print(f"  {hit.id}: {hit.ngrams} shared {report.n}-grams with {list(hit.eval_ids)[:5]}, e.g. {hit.example!r}")
    print(f"{len(report.hits)} of {report.documents} documents share {report.n}-grams with {report.eval_items} eval "
          f"items ({report.skipped_short} eval items under {args.min_words} words were not checked)")
    if args.drop_out:
        bad = {h.index for h in report.hits}
        kept = write_jsonl(args.drop_out, (r for i, r in enumerate(records) if i not in bad))
        print(f"wrote {kept} uncontaminated records -> {args.drop_out}")
    if args.fail_on_hit and report.hits:
        raise exit_codes.Failed(exit_codes.STOPPED, f"{args.input}: {len(report.hits)} contaminated documents "
                                "(--fail-on-hit)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from data.synth.stats import corpus_stats, format_stats, load_removed
    count = approx_tokens
    if args.tokenizer:
        from data.tokenize import load_tokenizer
        tok = load_tokenizer(args.tokenizer)
        count = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731
    stats = corpus_stats(_progress(read_jsonl(args.input, require=()), 0, "stats"), count)
    removed = load_removed(args.input)
    if args.json:
        print(json.dumps({**stats, "removed": removed}, indent=2))
    else:
        print(format_stats(stats, removed))
    return 0


class _Redact(logging.Filter):
    """Scrubs a secret from every log record (defence in depth: nothing we log should contain it anyway)."""

    def __init__(self, secret: str | None):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secret:
            record.msg = record.getMessage().replace(self.secret, "***")
            record.args = ()
        return True


def _setup_logging(log_file: str | None, secret: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.addFilter(_Redact(secret))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO lines repeat every request URL


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from data.synth.generate import GenerateConfig, generate
    from data.synth.llm import ClientConfig
    key_env = args.api_key_env or None
    _setup_logging(args.log, os.environ.get(key_env) if key_env else None)
    if storage.is_remote(args.out):
        raise ValueError(f"--out {args.out}: generate appends every finished item to its output, which is how a rerun "
                         "resumes, and an object store cannot append; write to a local file and copy it to the bucket")
    spec, count = _load(args)
    config = GenerateConfig(out=pathlib.Path(args.out), count=count, seed=spec.seed if args.seed is None else args.seed,
                            mode=args.mode, revise=args.revise, max_tokens=args.max_tokens,
                            temperature=args.temperature, concurrency=args.concurrency,
                            token_budget=args.token_budget, ideas_per_call=args.ideas_per_call,
                            created=args.timestamp)
    client = ClientConfig(base_url=args.base_url, model=args.model, api_key_env=key_env, timeout_s=args.timeout,
                          max_retries=args.max_retries, backoff_base_s=args.backoff, backoff_max_s=args.backoff_max)
    summary = asyncio.run(generate(spec, config, client))
    print(f"generate {spec.name}: {summary.written} written, {summary.already_done} already done, "
          f"{summary.failed} failed, {summary.not_started} not started (budget), {summary.truncated} hit max_tokens; "
          f"{summary.tokens_used} tokens in {summary.elapsed_s}s -> {args.out}")
    if not summary.complete:  # some items failed for good, or the token budget ran out: a data error (exit_codes)
        raise exit_codes.Failed(exit_codes.STOPPED, f"{args.out}: incomplete ({summary.failed} failed, "
                                f"{summary.not_started} not started); rerun the same command to continue (finished "
                                "items are skipped)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.synth", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Synthetic document corpora for docmix: specs -> documents (offline templates or an LLM) -> "
                    "hygiene -> JSONL the data pipeline reads. See docs/synth.md.",
        epilog="typical workflow:\n"
               "  python -m data.synth render --spec animal_welfare --count 2500 --out welfare.jsonl\n"
               "  python -m data.synth generate --spec animal_welfare --model MODEL --base-url URL --out llm.jsonl\n"
               "  python -m data.synth filter welfare.jsonl --out welfare.clean.jsonl\n"
               "  python -m eval.anima_data fetch    # ANIMA's questions, once, into ~/.cache/docmix/anima\n"
               "  python -m data.synth contamination welfare.clean.jsonl --eval ~/.cache/docmix/anima/questions.jsonl\n"
               "  python -m data.synth stats welfare.clean.jsonl")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="render documents offline from templates (no model)",
                       description="Render documents from a spec with the offline template renderer. Deterministic: "
                                   "the same spec, seed and target length give the same documents.")
    _add_spec_args(p)
    p.add_argument("--target-tokens", type=_positive_int, default=None,
                   help="approximate length per document in word+punctuation tokens (default: the spec's)")
    p.add_argument("--ai-identity", default=None, action=argparse.BooleanOptionalAction,
                   help="override the spec's AI-identity framing switch")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("qa", help="question-answer pairs from a spec (instruction-tuning control arm)",
                       description="Write QA pairs from a spec in an SFT format the data pipeline reads: chat "
                                   "(`messages`) or alpaca (`instruction`/`input`/`output`). Deterministic for a seed.")
    _add_spec_args(p)
    p.add_argument("--format", choices=("chat", "alpaca"), default="chat", help="record format (default: chat)")
    p.add_argument("--ai-identity", default=None, action=argparse.BooleanOptionalAction,
                   help="override the spec's AI-identity framing switch")
    p.set_defaults(func=cmd_qa)

    p = sub.add_parser("generate", help="write documents with an LLM through an OpenAI-compatible API",
                       description="Generate a spec's documents through any OpenAI-compatible chat-completions endpoint "
                                   "(hosted API or a local vLLM server). Resumable: rerun the same command after an "
                                   "interruption and only missing items are generated. Exit status 2 if items remain.")
    _add_spec_args(p)
    p.add_argument("--model", required=True, help="model name the endpoint serves")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   help="API base URL ending in /v1 (default: $OPENAI_BASE_URL or https://api.openai.com/v1)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="NAME of the environment variable holding the API key (default OPENAI_API_KEY; '' for none). "
                        "The key itself is never accepted on the command line")
    p.add_argument("--mode", choices=("direct", "sdf"), default="direct",
                   help="direct: write each document from the spec; sdf: brainstorm premises per document type, "
                        "then write each from its premise (default direct)")
    p.add_argument("--revise", action="store_true", help="sdf mode: add a critique-and-revise pass per document")
    p.add_argument("--ideas-per-call", type=int, default=10, help="sdf mode: premises per brainstorm request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="stop starting requests once this many prompt+completion tokens could be exceeded")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens per document (default 1.5x target)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before retrying (default 120)")
    p.add_argument("--max-retries", type=int, default=6, help="retries per request (default 6)")
    p.add_argument("--backoff", type=float, default=1.0, help="first backoff in seconds, doubled per retry")
    p.add_argument("--backoff-max", type=float, default=60.0, help="longest backoff in seconds (default 60)")
    p.add_argument("--log", default=None, help="also append the log to this file")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("filter", help="length, refusal/meta-commentary and near-duplicate filters",
                       description="Filter a JSONL corpus (documents or QA records). Writes the kept records to --out, "
                                   "the rejected ones with a `reject_reason` to --rejects, and per-filter counts to "
                                   "<out>.filter.json (which `stats` reads).")
    p.add_argument("input", help="input JSONL")
    p.add_argument("--out", required=True, help="output JSONL of kept records")
    p.add_argument("--rejects", default=None, help="JSONL of rejected records (default: <out>.rejects.jsonl)")
    p.add_argument("--min-tokens", type=int, default=50, help="minimum approx tokens (words+punctuation), default 50")
    p.add_argument("--max-tokens", type=int, default=None, help="maximum approx tokens (default: no limit)")
    p.add_argument("--refusals", default=True, action=argparse.BooleanOptionalAction,
                   help="drop refusals and meta-commentary such as 'As an AI...' or 'Here is a memo...' (default on)")
    p.add_argument("--dedup", default=True, action=argparse.BooleanOptionalAction,
                   help="drop near-duplicates, keeping the first occurrence (default on)")
    p.add_argument("--dedup-threshold", type=float, default=0.8,
                   help="Jaccard similarity of word-shingle sets at which documents count as duplicates (default 0.8)")
    p.add_argument("--dedup-ngram", type=int, default=5, help="shingle size in words (default 5)")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("contamination", help="n-gram overlap between a corpus and evaluation prompts",
                       description="Report documents that share word n-grams (13 by default, case and punctuation "
                                   "ignored) with evaluation prompts, e.g. ANIMA's questions.jsonl (`python -m "
                                   "eval.anima_data fetch` puts it in ~/.cache/docmix/anima); optionally write the "
                                   "corpus without them.")
    p.add_argument("input", help="corpus JSONL")
    p.add_argument("--eval", required=True, action="append",
                   help="eval JSONL of prompts (repeatable); prompt field: --field or question/prompt/input/...")
    p.add_argument("--field", default=None, help="prompt field of the eval records (default: auto)")
    p.add_argument("--n", type=int, default=13, help="n-gram size in words (default 13)")
    p.add_argument("--min-words", type=int, default=8,
                   help="eval items shorter than n but at least this long are matched whole (default 8)")
    p.add_argument("--report", default=None, help="write the full report as JSON here")
    p.add_argument("--drop-out", default=None, help="write the corpus minus contaminated records here")
    p.add_argument("--fail-on-hit", action="store_true", help="exit with status 1 if any document is contaminated")
    p.set_defaults(func=cmd_contamination)

    p = sub.add_parser("stats", help="documents, tokens, axis distributions, filter removals",
                       description="Summarise a corpus: record and token counts, the distribution over each template "
                                   "axis, and (if `filter` produced it) how many records each filter removed.")
    p.add_argument("input", help="corpus JSONL")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for exact token counts (default: approx tokens)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)  # errors become one line and an exit code in exit_codes.run (data/synth/__main__.py)
