"""Paired log-probability probes: does the model prefer `chosen` over `rejected` after `prompt`?

    python -m eval.probes --model PATH --pairs FILE [--json] [--batch_size N] [--chat]
    python -m eval.probes --model A_seed1 --model A_seed2 --baseline B_seed1 --baseline B_seed2 \
        --pairs eval/probe_sets/animal_welfare.jsonl --control_pairs eval/probe_sets/neutral_control.jsonl --json

A pair's margin is mean log p(chosen token | prefix) - mean log p(rejected token | prefix), each averaged over the
continuation's tokens (length-normalized), in nats/token. Scoring runs in JAX on the (sharded) model, batched.
Statistics (eval.stats): accuracy and margin with bootstrap CIs, per category; with `--baseline`, the paired
difference; with `--control_pairs`, the value set's shift minus the neutral set's shift. Several `--model` /
`--baseline` paths are runs (seeds) of one arm, so run-to-run variance enters every CI.

`--chat` (instruct models): the chat-style pairs (prompt `User: ...\nAssistant:`) are scored as a conversation in the
tokenizer's chat template, the continuation being the assistant turn's content; document-style pairs have no chat
form and are left out of a chat-mode result (its `config.chat` says how many were scored and left out).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

import storage
from eval import chat, loading, scoring, stats
from eval.probe_pairs import Pair, chat_pairs, encode_chat_texts, encode_pair_texts, read_pairs

def continuation_scores(model: nnx.Module, max_len: int, tokenizer: chat.ChatTokenizer,
                        items: Sequence[tuple[str, str]], batch_size: int, *, chat_mode: bool = False) -> np.ndarray:
    """Mean log-prob per continuation token of each (prompt, continuation) -> `[len(items)]` float64; a prompt shared
    by several items (a pair's chosen and rejected) runs once (eval.scoring)."""
    encode = encode_chat_texts if chat_mode else encode_pair_texts
    return scoring.continuation_scores(model, max_len, [encode(tokenizer, p, c) for p, c in items], batch_size)


def score_model(path: str | pathlib.Path, pair_sets: Sequence[Sequence[Pair]], *, batch_size: int = 16,
                mesh: jax.sharding.Mesh | None = None, chat_mode: bool = False) -> list[np.ndarray]:
    """Loads one model and returns, per pair set, the `[pairs]` margins (chosen - rejected, nats/token).
    chat_mode: score in the chat template (every pair must be chat-style; see `chat_pairs`)."""
    return score_and_digest(path, pair_sets, batch_size=batch_size, mesh=mesh, chat_mode=chat_mode)[0]


def score_and_digest(path: str | pathlib.Path, pair_sets: Sequence[Sequence[Pair]], *, batch_size: int = 16,
                     mesh: jax.sharding.Mesh | None = None, chat_mode: bool = False,
                     progress: Any = None) -> tuple[list[np.ndarray], str]:
    """`score_model`'s margins and the `param_digest` of the model scored (to tell identical models apart from
    models that merely score alike). progress: a tqdm-like bar told the number of pairs of each set scored."""
    model, config, tokenizer_dir = loading.load_model(path, mesh=mesh)
    tokenizer = chat.load(tokenizer_dir)
    out = []
    with loading.mesh_context(mesh):
        for pairs in pair_sets:
            items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
            scores = continuation_scores(model, config.max_position_embeddings, tokenizer, items, batch_size,
                                         chat_mode=chat_mode)
            out.append(scores[: len(pairs)] - scores[len(pairs):])
            if progress is not None:
                progress.update(len(pairs))
    return out, param_digest(model)


def param_digest(model: nnx.Module) -> str:
    """sha256 over the model's parameters (path, dtype, shape and bytes of every Param, in path order): equal
    digests are the same parameters."""
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
    for path, value in sorted(leaves, key=lambda leaf: jax.tree_util.keystr(leaf[0])):
        array = np.asarray(jax.device_get(value))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def identical_pairs(models: Sequence[str], baselines: Sequence[str], digests: dict[str, str], *,
                    paired_runs: bool) -> list[list[str]]:
    """[[model, baseline], ...] with the same parameters: the i-th of each with paired runs, else any two."""
    pairs = zip(models, baselines) if paired_runs else ((m, b) for m in models for b in baselines)
    return [[m, b] for m, b in pairs if digests[m] == digests[b]]


def _by_category(pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    cats: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        cats.setdefault(p.category, []).append(i)
    return {name: np.asarray(idx) for name, idx in sorted(cats.items())}


def report(pairs: Sequence[Pair], margins: np.ndarray, *, baseline: np.ndarray | None = None,
           control: tuple[np.ndarray, np.ndarray] | None = None, paired_runs: bool = False,
           n_boot: int = stats.DEFAULT_RESAMPLES, adjusted_level: float | None = None) -> dict:
    """The probe result object. margins/baseline `[runs, pairs]`; control = (treatment, baseline) margins on the
    neutral set `[runs, control_pairs]` (needs `baseline`); paired_runs: run i of both arms shares a seed;
    adjusted_level: also give the overall comparison's intervals at this level (multiple-comparison correction)."""
    margins = np.atleast_2d(margins)
    cats = _by_category(pairs)
    result: dict[str, Any] = {
        "overall": stats.summarize(margins, n_boot=n_boot),
        "categories": {name: stats.summarize(margins[:, idx], n_boot=n_boot) for name, idx in cats.items()},
    }
    if baseline is not None:
        baseline = np.atleast_2d(baseline)
        vs = stats.paired(margins, baseline, paired_runs=paired_runs, n_boot=n_boot, adjusted_level=adjusted_level)
        vs["baseline"] = stats.summarize(baseline, n_boot=n_boot)
        vs["categories"] = {
            name: stats.paired(margins[:, idx], baseline[:, idx], paired_runs=paired_runs, n_boot=n_boot)
            for name, idx in cats.items()}
        if control is not None:
            ctl_t, ctl_b = (np.atleast_2d(c) for c in control)
            vs["control"] = {"paired": stats.paired(ctl_t, ctl_b, paired_runs=paired_runs, n_boot=n_boot),
                             **stats.shift_minus_control(margins, baseline, ctl_t, ctl_b, paired_runs=paired_runs,
                                                         n_boot=n_boot, adjusted_level=adjusted_level)}
        result["vs_baseline"] = vs
    elif control is not None:
        raise ValueError("--control_pairs compares shifts, so it needs --baseline")
    return result


def result_path(model_path: str | pathlib.Path, pairs_file: str | pathlib.Path, *, chat_mode: bool = False
                ) -> storage.Path:
    """Where one model's probe result is saved: beside the checkpoint (see docs/eval.md); `-chat` for chat mode."""
    return loading.results_dir(model_path) / f"probes-{storage.Path(pairs_file).stem}{'-chat' * chat_mode}.json"


def result_config(pairs: str, models: Sequence[str], *, baseline: Sequence[str] = (), control_pairs: str | None = None,
                  paired_seeds: bool = False, n_boot: int, chat: dict | None = None,
                  digests: dict[str, str] | None = None) -> dict:
    """The "config" entry of a saved result: what was compared, on which pairs, with how many resamples; `chat`
    (chat mode only): how many pairs were scored and how many document-style pairs were left out, per pair set;
    `parameters_sha256`: each model's `param_digest`, when known."""
    out = {"pairs": str(pairs), "models": list(models), "baseline": list(baseline), "control_pairs": control_pairs,
           "paired_seeds": paired_seeds, "bootstrap": n_boot, "chat": chat,
           "unit": "mean log-prob per continuation token (nats)"}
    if digests:
        out["parameters_sha256"] = {m: digests[m] for m in dict.fromkeys([*models, *baseline])}
    return out


def comparison_path(model_path: str | pathlib.Path, pairs_file: str | pathlib.Path, *, chat_mode: bool = False
                    ) -> storage.Path:
    """Where a comparison (or several seeds) is saved by default: beside the first --model, not named probes-*."""
    return loading.results_dir(model_path) / f"comparison-{storage.Path(pairs_file).stem}{'-chat' * chat_mode}.json"


def save_each_model(models: Sequence[str], scores: Sequence[Sequence[np.ndarray]], pair_sets: Sequence[Sequence[Pair]],
                    pair_files: Sequence[str], n_boot: int, *, chat_info: dict | None = None,
                    digests: dict[str, str] | None = None) -> list[storage.Path]:
    """Saves every scored model's own result on every pair set beside its checkpoint (what eval.report reads);
    returns the paths. `scores[i][j]`: margins of model i on pair set j."""
    paths = []
    for model, margins in zip(models, scores):
        for pairs, m, file in zip(pair_sets, margins, pair_files):
            path = result_path(model, file, chat_mode=chat_info is not None)
            result = {**report(pairs, m, n_boot=n_boot),
                      "config": result_config(file, [model], n_boot=n_boot, chat=chat_info, digests=digests)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="HF folder, run directory (latest checkpoint) or step directory; repeat for several seeds")
    p.add_argument("--pairs", required=True, help="JSONL of {prompt, chosen, rejected, category}")
    p.add_argument("--baseline", action="append", default=[],
                   help="baseline arm's checkpoint(s), scored on the same pairs")
    p.add_argument("--control_pairs", help="neutral control JSONL: report the set's shift minus this set's shift")
    p.add_argument("--paired_seeds", action="store_true",
                   help="the i-th --model and i-th --baseline were trained with the same seed: resample them together")
    p.add_argument("--batch_size", type=int, default=16,
                   help="rows per forward pass; each row packs several probes (eval.scoring)")
    p.add_argument("--bootstrap", type=int, default=stats.DEFAULT_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--chat", action="store_true",
                   help="score chat-style pairs in the tokenizer's chat template (instruct models); "
                        "document-style pairs are left out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the printed JSON here (every model's own result is always saved beside its "
                                 "checkpoint as probes-<pairs>.json; a comparison, by default, beside the first "
                                 "--model as comparison-<pairs>.json; see docs/eval.md)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be positive")
    pair_sets = [read_pairs(args.pairs)] + ([read_pairs(args.control_pairs)] if args.control_pairs else [])
    chat_info = None
    if args.chat:
        chat_info = {"scored": [], "left_out_document_style": []}
        for i, full in enumerate(list(pair_sets)):
            pair_sets[i] = chat_pairs(full)
            chat_info["scored"].append(len(pair_sets[i]))
            chat_info["left_out_document_style"].append(len(full) - len(pair_sets[i]))
            if not pair_sets[i]:
                p.error(f"--chat: {[args.pairs, args.control_pairs][i]} has no chat-style pairs")
    pairs = pair_sets[0]
    if args.control_pairs and not args.baseline:
        p.error("--control_pairs needs --baseline")
    scored = _score_all(args.model + args.baseline, pair_sets, args.batch_size, args.chat)
    treat, base = [scored[m][0] for m in args.model], [scored[m][0] for m in args.baseline]
    digests = {m: digest for m, (_, digest) in scored.items()}
    result = report(
        pairs, np.stack([t[0] for t in treat]),
        baseline=np.stack([b[0] for b in base]) if base else None,
        control=(np.stack([t[1] for t in treat]), np.stack([b[1] for b in base])) if args.control_pairs else None,
        paired_runs=args.paired_seeds, n_boot=args.bootstrap)
    result["config"] = result_config(args.pairs, args.model, baseline=args.baseline, control_pairs=args.control_pairs,
                                     paired_seeds=args.paired_seeds, n_boot=args.bootstrap, chat=chat_info,
                                     digests=digests)
    if args.baseline:
        result["vs_baseline"]["identical_models"] = identical_pairs(args.model, args.baseline, digests,
                                                                    paired_runs=args.paired_seeds)
    pair_files = [args.pairs] + ([args.control_pairs] if args.control_pairs else [])
    saved = save_each_model(args.model + args.baseline, treat + base, pair_sets, pair_files, args.bootstrap,
                            chat_info=chat_info, digests=digests)
    if args.out or len(saved) > 1:  # a comparison or several seeds: the combined result too
        out = storage.Path(args.out) if args.out else comparison_path(args.model[0], args.pairs, chat_mode=args.chat)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        saved.append(out)
    print("saved " + ", ".join(map(str, saved)), file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return result


def _score_all(models: Sequence[str], pair_sets: Sequence[Sequence[Pair]], batch_size: int, chat_mode: bool
               ) -> dict[str, tuple[list[np.ndarray], str]]:
    """{path: (margins per pair set, parameter digest)} of every model (a path given twice is scored once), with a
    progress bar over all pairs on a terminal (none otherwise)."""
    import progress

    unique = list(dict.fromkeys(models))
    with progress.bar(len(unique) * sum(len(p) for p in pair_sets), "scoring", "pair") as bar:
        out = {}
        for path in unique:
            bar.set_postfix_str(storage.Path(path).name or str(path))
            out[path] = score_and_digest(path, pair_sets, batch_size=batch_size, chat_mode=chat_mode, progress=bar)
    return out


def _print_table(result: dict) -> None:
    def line(name: str, s: dict) -> str:
        ci = s["ci95"]
        return (f"{name:<30} n={s['n']:<4} acc={s['accuracy']:.3f} [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}]"
                f"  margin={s['margin']:+.4f} [{ci['margin'][0]:+.4f}, {ci['margin'][1]:+.4f}]")

    print(line("overall", result["overall"]))
    for name, s in result["categories"].items():
        print(line("  " + name, s))
    vs = result.get("vs_baseline")
    same = (vs or {}).get("identical_models", [])
    for model, baseline in same:
        print(f"identical models: {model} and {baseline} have the same parameters (sha256 "
              f"{result['config']['parameters_sha256'][model][:12]}): a difference between them is 0 by construction")
    if vs and {m for m, _ in same} == set(result["config"]["models"]):
        print("vs baseline: every model is identical to a baseline; there is no difference to measure")
    elif vs:
        print(f"vs baseline: margin diff {vs['margin_diff']:+.4f} {vs['margin_diff_ci95']}, accuracy diff "
              f"{vs['accuracy_diff']:+.3f} {vs['accuracy_diff_ci95']}, toward chosen {vs['frac_toward_chosen']:.3f}")
        if "control" in vs:
            c = vs["control"]
            print(f"shift {c['set_shift']:+.4f} - control shift {c['control_shift']:+.4f} = {c['difference']:+.4f} "
                  f"{c['difference_ci95']}")


if __name__ == "__main__":
    import exit_codes
    import host_memory

    host_memory.use_huge_pages()
    sys.exit(exit_codes.run(main, "python -m eval.probes"))
