"""The ANIMA dataset (questions.jsonl + dimensions.jsonl): fetched once from the Hugging Face Hub into a local copy, and
read from a local copy as Inspect samples and dimensions.

    python -m eval.anima_data fetch [--out DIR]

`fetch` downloads the `questions` and `dimensions` configs of `CompassioninMachineLearning/anima` at the revision
inspect_evals pins (ANIMA-2.2) into DIR (default `~/.cache/docmix/anima`, under `$XDG_CACHE_HOME` when set) as
questions.jsonl and dimensions.jsonl, with `source.json` saying where they came from. A copy already there is used
as is (no network). The Hub's base URL is `$HF_ENDPOINT` (default https://huggingface.co), as for huggingface_hub.
Where the network does not reach it, `fetch` fails at once (one request, a short timeout) with exit 3 and the URL.
The data is CC-BY-NC-4.0: it is fetched by the user, never shipped in the repository.

Releases spell dimension names differently (AHB 2.x "Trade-off Transparency", ANIMA-2.2 "Trade-Off Transparency"),
one question in AHB 2.x has an empty tag, and `variables` may carry spaces after the colon. The stock Hub loader drops
any question with an unrecognised tag; here tags are normalised to ANIMA-2.2 spelling, empty tags are skipped, tags
naming no dimension are reported (logged and returned), and a question left with nothing to score is an error.
Reading a copy as Inspect samples needs the eval extra (requirements-eval.txt); fetching does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import os
import pathlib
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import storage

if TYPE_CHECKING:
    from inspect_ai.dataset import Sample
    from inspect_evals.anima.types import AnimaDimension

logger = logging.getLogger(__name__)

# ANIMA-2.2 spelling (CompassioninMachineLearning/anima @ the inspect_evals pinned revision).
ANIMA_DIMENSIONS = (
    "Moral Consideration", "Harm Minimization", "Sentience Acknowledgement", "Prejudice Avoidance",
    "Scope Sensitivity", "Evidence-Based Capacity Attribution", "Cautious Impact Consideration", "Actionability",
    "Contextual Welfare Salience", "Epistemic Humility", "Trade-Off Transparency", "Novel Entity Precaution",
    "Control Questions",
)
_CANONICAL = {name.lower(): name for name in ANIMA_DIMENSIONS}


def canonical_dimension(name: str) -> str:
    """Collapses whitespace and maps spelling variants (case) onto ANIMA-2.2's name; unknown names keep their text."""
    collapsed = " ".join(name.split())
    return _CANONICAL.get(collapsed.lower(), collapsed)


@dataclasses.dataclass(frozen=True)
class LocalAnima:
    dimensions: tuple[AnimaDimension, ...]
    samples: tuple[Sample, ...]
    ignored_tags: dict[int, tuple[str, ...]]  # question id -> tags that name no dimension (not scored)
    files_sha256: dict[str, str]  # questions.jsonl / dimensions.jsonl -> digest, to identify the copy

    @property
    def dims_by_name(self) -> dict[str, AnimaDimension]:
        return {d.name: d for d in self.dimensions}


def _read_jsonl(path: storage.Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (an ANIMA dataset dir holds questions.jsonl and dimensions.jsonl)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
    return rows


def _require(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def load_dimensions(path: storage.Path) -> tuple[AnimaDimension, ...]:
    from inspect_evals.anima.types import AnimaDimension

    dims = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _require(row, ("dimension", "guiding_question", "scoring"), where)
        dims.append(AnimaDimension(
            name=canonical_dimension(row["dimension"]),
            weight=float(row.get("default_weighting", 1.0)),
            scoring_description=row["scoring"],
            guiding_question=row["guiding_question"],
            indicators=row.get("observable_indicators") or "",
        ))
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate dimension names after normalisation: {names}")
    return tuple(dims)


def parse_variables(text: str | None, where: str) -> str | None:
    """'animal: guinea pig, naked mole rats' -> 'animal:guinea pig,naked mole rats' (one `key:values` per line)."""
    if not text or not text.strip():
        return None
    lines = []
    for spec in text.strip().split("\n"):
        key, sep, values = spec.partition(":")
        cleaned = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not cleaned:
            raise ValueError(f"{where}: malformed variables {spec!r} (expected 'name: value, value')")
        lines.append(f"{key.strip()}:{','.join(cleaned)}")
    return "\n".join(lines)


def load(dataset_dir: str | pathlib.Path, languages: Sequence[str] | None = None) -> LocalAnima:
    """Reads `dataset_dir`/{questions,dimensions}.jsonl. `languages` keeps only those languages (null -> "English")."""
    from inspect_ai.dataset import Sample
    from inspect_evals.anima.dataset import record_to_sample

    root = storage.Path(dataset_dir)
    dimensions = load_dimensions(root / "dimensions.jsonl")
    known = {d.name for d in dimensions}
    convert = record_to_sample(known)
    wanted = {lang.strip() for lang in languages} if languages else None
    samples, ignored = [], {}
    for lineno, row in _read_jsonl(root / "questions.jsonl"):
        where = f"{root / 'questions.jsonl'}:{lineno}"
        _require(row, ("id", "question", "tags"), where)
        if not isinstance(row["tags"], list) or not str(row["question"]).strip():
            raise ValueError(f"{where}: 'tags' must be a list and 'question' non-empty")
        tags = [canonical_dimension(t) for t in row["tags"] if t and t.strip()]
        unknown = tuple(t for t in tags if t not in known)
        if unknown:
            logger.warning("%s: question %s: tags %s name no dimension and are not scored", where, row["id"], unknown)
            ignored[row["id"]] = unknown
        scored = list(dict.fromkeys(t for t in tags if t in known))
        if not scored:
            raise ValueError(f"{where}: question {row['id']} has no tag naming a dimension (tags {row['tags']!r})")
        language = row.get("language") or "English"
        if wanted is not None and language not in wanted:
            continue
        record = {**row, "tags": scored, "variables": parse_variables(row.get("variables"), where), "language": language}
        sample = convert(record)
        if not isinstance(sample, Sample):  # inspect_evals returns [] for a record it would skip
            raise ValueError(f"{where}: inspect_evals rejected question {row['id']}")
        samples.append(sample)
    if not samples:
        raise ValueError(f"{root}: no questions left (languages={languages!r})")
    digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()
               for name in ("questions.jsonl", "dimensions.jsonl")}
    return LocalAnima(dimensions=dimensions, samples=tuple(samples), ignored_tags=ignored, files_sha256=digests)


HUB_REPO = "CompassioninMachineLearning/anima"
HUB_REVISION = "c658f00e80529c8b2d81bb89d95df6af4d4b5bf6"  # ANIMA-2.2: inspect_evals' DATASET_DEFAULT_REVISION
CONFIGS = ("questions", "dimensions")  # the dataset's configs, each written as NAME.jsonl (split "train")
SOURCE_FILE = "source.json"
TIMEOUT_S = 15


def default_dir() -> storage.Path:
    """The user's cache folder for the fetched copy: $XDG_CACHE_HOME/docmix/anima, else ~/.cache/docmix/anima."""
    return storage.Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "docmix" / "anima"


def _get(url: str) -> bytes:
    """One GET with a short timeout and no retries; any failure is a ConnectionError naming the URL (exit 3)."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise ConnectionError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # no route, DNS, refused, timed out
        raise ConnectionError(f"cannot fetch {url}: {getattr(e, 'reason', e)}") from None


def _train_files(card: dict[str, Any], config: str, files: Sequence[str]) -> list[str]:
    """The repository files of `config`'s train split, from the dataset card's `configs` (data_files: a pattern, a
    list of patterns, or a list of {split, path}), or else files named after the config."""
    entry = next((c for c in card.get("configs") or [] if c.get("config_name") == config), None)
    data_files = entry.get("data_files") if entry else [f"{config}.*", f"{config}/*", f"data/{config}[-_.]*"]
    items = data_files if isinstance(data_files, list) else [data_files]
    patterns = []
    for item in items:
        if isinstance(item, dict):
            if item.get("split", "train") == "train":
                paths = item.get("path")
                patterns += paths if isinstance(paths, list) else [paths]
        elif isinstance(item, str):
            patterns.append(item)
    matched = sorted({f for pattern in patterns for f in files if fnmatch.fnmatch(f, pattern)})
    if not matched:
        raise ValueError(f"config {config!r}: no file matches {patterns}")
    return matched


def _rows(name: str, data: bytes) -> list[dict[str, Any]]:
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8")
    if name.endswith(".json") and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check(config: str, rows: list[dict[str, Any]], where: str) -> None:
    needed = {"questions": ("id", "question", "tags"), "dimensions": ("dimension", "guiding_question", "scoring")}
    if not rows:
        raise ValueError(f"{where}: no rows")
    for i, row in enumerate(rows):
        _require(row, needed[config], f"{where}: row {i}")


def fetch(out: str | os.PathLike | None = None, *, endpoint: str | None = None) -> storage.Path:
    """Writes questions.jsonl, dimensions.jsonl and source.json of ANIMA at `HUB_REVISION` into `out` (default
    `default_dir()`) and returns it. A copy of this revision already there is kept without a request. Refuses a folder
    holding these files that fetch did not write (nothing of the user's is overwritten)."""
    out = storage.Path(out if out is not None else default_dir())
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    names = [f"{config}.jsonl" for config in CONFIGS]
    if (out / SOURCE_FILE).exists():
        source = json.loads((out / SOURCE_FILE).read_text())
        if source.get("revision") == HUB_REVISION and all((out / n).exists() for n in names):
            return out
    elif any((out / n).exists() for n in names):
        raise FileExistsError(f"{out} holds {' / '.join(names)} not written by `fetch` (no {SOURCE_FILE}); choose "
                              "another --out")
    api = f"{endpoint}/api/datasets/{HUB_REPO}/revision/{HUB_REVISION}"
    info = json.loads(_get(api))
    files = [s["rfilename"] for s in info.get("siblings", [])]
    source = {"repo": HUB_REPO, "revision": HUB_REVISION, "license": "cc-by-nc-4.0", "files": {}}
    contents = {}
    for config, name in zip(CONFIGS, names):
        rows, raw = [], []
        for path in _train_files(info.get("cardData") or {}, config, files):
            url = f"{endpoint}/datasets/{HUB_REPO}/resolve/{HUB_REVISION}/{urllib.parse.quote(path)}"
            data = _get(url)
            rows += _rows(path, data)
            raw.append((path, data))
            source["files"].setdefault(name, []).append(url)
        _check(config, rows, f"{HUB_REPO}@{HUB_REVISION[:12]} {config}")
        single_jsonl = len(raw) == 1 and raw[0][0].endswith(".jsonl")  # kept byte for byte
        contents[name] = raw[0][1] if single_jsonl else "".join(
            json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        source.setdefault("sha256", {})[name] = hashlib.sha256(contents[name]).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (out / name).write_bytes(data)
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")  # last: marks a complete copy
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.anima_data", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help=f"download the ANIMA questions and dimensions ({HUB_REPO}) once")
    f.add_argument("--out", help=f"folder for the copy (default: {default_dir()})")
    args = parser.parse_args(argv)
    out = fetch(args.out)
    print(f"ANIMA ({HUB_REPO}@{HUB_REVISION[:12]}, CC-BY-NC-4.0) in {out}: "
          + ", ".join(f"{out / name}" for name in ("questions.jsonl", "dimensions.jsonl")))
    return 0


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m eval.anima_data"))
