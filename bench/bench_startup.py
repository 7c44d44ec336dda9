"""Data start-up of one host: wall time and peak RSS of process 0 of 8 building its pipeline and first batch, for
generated JSONL corpora of growing size, with this checkout's code and (optionally) another checkout's (e.g. main).

    python bench/bench_startup.py [--docs 10000 100000 1000000] [--other_repo /path/to/main] [--json OUT]

Each measurement runs in a fresh subprocess (peak RSS = its ru_maxrss). Documents are ~60 words (~400 bytes of JSON);
the mixture has one JSONL component of `--files` files, 8 data shards, process 0 of 8.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
from data.config import Component, MixtureConfig
from data.pipeline import build
config = MixtureConfig(components=(Component("c", paths=tuple(json.loads(sys.argv[2]))),), weights={"c": 1.0},
                       tokenizer=sys.argv[3], seq_len=128, batch_size=8, block_size=8, num_shards=8)
t1 = time.perf_counter()
pipe = build(config, process_index=0, process_count=8)
next(pipe.iterator)
t2 = time.perf_counter()
stats = pipe.stats()["components"]["c"]
print(json.dumps({"startup_s": t2 - t1, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "records_parsed": stats.get("records_parsed"), "bytes_read": stats.get("bytes_read")}))
"""


def write_corpus(folder: pathlib.Path, docs: int, files: int) -> list[str]:
    paths = []
    per = -(-docs // files)
    for k in range(files):
        path = folder / f"part{k:03d}.jsonl"
        with open(path, "w") as f:
            for i in range(k * per, min(docs, (k + 1) * per)):
                f.write(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 5000}" for j in range(60))}) + "\n")
        paths.append(str(path))
    return paths


def measure(repo: pathlib.Path, paths: list[str], tokenizer: pathlib.Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(repo), json.dumps(paths), str(tokenizer)],
                         capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--other_repo", help="a second checkout to measure the same way (e.g. main, for 'before')")
    parser.add_argument("--json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.test_data_util import word_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = word_tokenizer(pathlib.Path(tmp) / "tok")
        for docs in args.docs:
            folder = pathlib.Path(tmp) / f"c{docs}"
            folder.mkdir()
            paths = write_corpus(folder, docs, args.files)
            size = sum(pathlib.Path(p).stat().st_size for p in paths)
            repos = [("this", REPO)] + ([("other", pathlib.Path(args.other_repo))] if args.other_repo else [])
            for label, repo in repos:
                row = {"code": label, "docs": docs, "corpus_mib": size / 2**20, **measure(repo, paths, tokenizer)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for p in paths:
                pathlib.Path(p).unlink()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
