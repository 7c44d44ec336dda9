"""Command line for data.synth: one subcommand per step, each with --help, a progress bar and a summary."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from tqdm import tqdm

from data.synth.records import approx_tokens, record_text, timestamp, write_jsonl
from data.synth.spec import bundled_specs, load_spec

_SPEC_HELP = "bundled spec name ({}) or a path to a spec YAML file"


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help=_SPEC_HELP.format(", ".join(bundled_specs())))
    p.add_argument("--count", type=int, default=None, help="number of items (default: the spec's count)")
    p.add_argument("--seed", type=int, default=None, help="seed for axis assignment and wording (default: the spec's)")
    p.add_argument("--out", required=True, help="output JSONL path (written atomically)")
    p.add_argument("--timestamp", default=None,
                   help="fixed `created` value for byte-identical reruns (default: SOURCE_DATE_EPOCH or now)")


def _progress(items, total: int, desc: str):
    return tqdm(items, total=total, desc=desc, unit="doc", disable=total < 200 or not sys.stderr.isatty())


def _load(args: argparse.Namespace):
    spec = load_spec(args.spec)
    if getattr(args, "ai_identity", None) is not None:
        spec = spec.with_overrides(ai_identity=args.ai_identity)
    return spec, spec.count if args.count is None else args.count


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="render documents offline from templates (no model)",
                       description="Render documents from a spec with the offline template renderer. Deterministic: "
                                   "the same spec, seed and target length give the same documents.")
    _add_spec_args(p)
    p.add_argument("--target-tokens", type=int, default=None,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
