"""Probe scoring speed on SmolLM2-135M (CPU): eval.probes' scoring vs a transformers forward on the same pairs.

    python -m bench.bench_probes [--sets eval/probe_sets/animal_welfare.jsonl ...] [--batch_size 16] [--repeats 3]

Both sides score every pair's chosen and rejected continuation (mean log-prob per continuation token) of the given
sets, from the same token ids (eval.probes' encoding). The reference is what a researcher would write with
transformers: one forward over prompt + continuation per row, rows sorted by length and right-padded in batches of
`--batch_size`, log-softmax at the continuation's positions. docmix is timed through `probes.continuation_scores`
(what `eval.probes` and the sweeps run), its first pass (compiles) reported apart. Runs alternate in one process;
medians are reported with their ratio, and the largest margin difference between the two checks they agree.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

DEFAULT_SETS = ["eval/probe_sets/animal_welfare.jsonl", "eval/probe_sets/neutral_control.jsonl"]


def _torch_scores(hf_model, encoded: list[tuple[list[int], int]], batch_size: int):
    import numpy as np
    import torch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    scores = np.zeros(len(encoded))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            length = max(len(encoded[i][0]) for i in idx)
            tokens = torch.zeros((len(idx), length), dtype=torch.long)
            attention = torch.zeros((len(idx), length), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i][0]
                tokens[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
            logp = torch.log_softmax(hf_model(input_ids=tokens, attention_mask=attention).logits.float(), -1)
            for row, i in enumerate(idx):
                ids, n_context = encoded[i]
                target = torch.tensor(ids[n_context:])
                scores[i] = logp[row, n_context - 1: len(ids) - 1].gather(-1, target[:, None]).mean().item()
    return scores


def run(hf_dir: str, set_paths: list[str], batch_size: int, repeats: int) -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    from eval import chat, loading, probe_pairs, probes

    pairs = [p for path in set_paths for p in probe_pairs.read_pairs(path)]
    items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    model, config, tokenizer_dir = loading.load_model(hf_dir)
    tokenizer = chat.load(tokenizer_dir)
    encoded = [probe_pairs.encode_pair_texts(tokenizer, p, c) for p, c in items]
    scored_tokens = sum(len(ids) - n for ids, n in encoded)
    all_tokens = sum(len(ids) for ids, _ in encoded)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def docmix():
        return probes.continuation_scores(model, config.max_position_embeddings, tokenizer, items, batch_size)

    start = time.perf_counter()
    ours = docmix()
    first_pass = time.perf_counter() - start
    theirs = _torch_scores(hf_model, encoded, batch_size)
    times: dict[str, list[float]] = {"docmix": [], "torch": []}
    for _ in range(repeats):
        start = time.perf_counter()
        docmix()
        times["docmix"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _torch_scores(hf_model, encoded, batch_size)
        times["torch"].append(time.perf_counter() - start)
    n = len(pairs)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"pairs": n, "sequences": len(items), "scored_tokens": scored_tokens, "input_tokens": all_tokens,
            "batch_size": batch_size, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "jax_devices": str(jax.devices()[0]), "docmix_first_pass_s": first_pass,
            **{f"{k}_median_s": v for k, v in median.items()},
            **{f"{k}_scored_tokens_per_s": scored_tokens / v for k, v in median.items()},
            "docmix_speedup_vs_torch": median["torch"] / median["docmix"],
            "max_margin_difference": float(np.abs((ours[:n] - ours[n:]) - (theirs[:n] - theirs[n:])).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=DEFAULT_SETS, help="probe set files (JSONL)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf_dir", default=None, help="SmolLM2 HF folder (default: the cached test asset)")
    parser.add_argument("--out", default=None, help="also write the results JSON here")
    args = parser.parse_args()
    if args.hf_dir is None:
        from tests.assets import smollm2_dir

        args.hf_dir = str(smollm2_dir())
    results = {"model": "SmolLM2-135M-Instruct fp32", "cpu_count": os.cpu_count(),
               "load_average_at_start": os.getloadavg(), **run(args.hf_dir, args.sets, args.batch_size, args.repeats),
               "load_average_at_end": os.getloadavg()}
    from bench.bench_models import print_and_save

    print_and_save(results, args.out)


if __name__ == "__main__":
    import host_memory

    host_memory.use_huge_pages()  # as docmix's entry points run (both frameworks share the process)
    main()
