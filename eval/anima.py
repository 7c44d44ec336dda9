"""ANIMA (Animal Norms In Moral Assessment) through Inspect, on an exported HF folder or an OpenAI-compatible server.

    python -m eval.anima --model runs/x/hf --grader openai/gpt-4o-mini [--dataset_dir DIR] [--epochs N] [--limit N]
    python -m eval.anima --model http://127.0.0.1:8000/v1 --grader hf/ABS/PATH --out results/anima.json
    python -m eval.anima --model runs/x/hf --grader hf/ABS/PATH --dataset_dir ~/.cache/docmix/anima --limit 3 --epochs 1

Runs `inspect_evals`' ANIMA scorer and metrics unchanged. The dataset comes from the Hugging Face Hub at the task's
pinned revision, or from a local copy (`--dataset_dir`: `python -m eval.anima_data fetch` makes one). Results go to `anima.json` beside the
checkpoint (or `--out`); higher is better, a grade C counts 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import exit_codes

try:
    import inspect_ai
    import inspect_evals.anima  # noqa: F401
except ImportError as err:  # an optional extra: one line and exit 3 (exit_codes), not a traceback
    MISSING_EXTRA = f"needs the eval extra ({err.name} is not installed): pip install -r requirements-eval.txt"
    if __name__ == "__main__":
        sys.exit(exit_codes.report(exit_codes.ServiceUnavailable(MISSING_EXTRA), "python -m eval.anima"))
    raise ImportError(f"eval.anima {MISSING_EXTRA}", name=err.name) from err
from inspect_ai.log import EvalLog
from inspect_ai.model import GenerateConfig, Model, get_model
from inspect_ai.solver import generate
from inspect_evals.anima import anima as hub_anima_task
from inspect_evals.anima.dataset import DATASET_DEFAULT_REVISION, DATASET_REPO_ID
from inspect_evals.anima.metrics import avg_by_dimension, dimension_normalized_avg, overall_mean
from inspect_evals.anima import scorer as anima_scorer_module
from inspect_evals.anima.scorer import anima_scorer

import storage
from eval import anima_data, loading


RESULT_FILE = "anima.json"
NON_DIMENSION_METRICS = ("overall_mean", "dimension_normalized_avg", "avg_by_dimension")
# The server reads no key; the OpenAI client needs one. A real key for a remote server comes from this variable.
API_KEY_ENV = "DOCMIX_API_KEY"


_upstream_explanation = anima_scorer_module._generate_explanation


def _explanation_of_graded_dimensions(overall_score: float, target_dimensions: list[str], dimensions: Any,
                                      dim_vsets: Any, results_by_dim_var_set: Any, avg_by_dim: dict[str, float],
                                      grader_models: Any = None) -> str:
    """inspect_evals 0.26.0 raises KeyError when one dimension of a sample got no parseable grade but another did
    (its explanation indexes every tagged dimension). The scores already leave such a dimension out, as the scorer
    documents, and this explanation is given only the graded dimensions. The grades themselves stay in the score
    metadata (None = unparseable)."""
    graded = [d for d in target_dimensions if d in avg_by_dim]
    return _upstream_explanation(overall_score, graded, dimensions, dim_vsets, results_by_dim_var_set, avg_by_dim,
                                 grader_models)


anima_scorer_module._generate_explanation = _explanation_of_graded_dimensions


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to hand Inspect for a `--model`/`--grader` argument, and where results of an HF folder belong."""

    name: str  # Inspect model name, e.g. "hf/<abs dir>" or "openai-api/docmix/<served id>"
    base_url: str | None = None
    hf_dir: storage.Path | None = None

    @property
    def local(self) -> bool:
        """Inspect's hf provider: the weights are loaded into this process."""
        return self.name.startswith("hf/")

    def model(self, config: GenerateConfig = GenerateConfig(), role: str | None = None, memoize: bool = True
              ) -> Model:
        if self.base_url is None:
            return get_model(self.name, config=config, role=role, memoize=memoize)
        return get_model(self.name, base_url=self.base_url, api_key=os.environ.get(API_KEY_ENV, "none"),
                         config=config, role=role, memoize=memoize)


def served_model_id(base_url: str) -> str:
    """The first model id listed by an OpenAI-compatible server's /v1/models."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(API_KEY_ENV, "none"))
    try:
        ids = [m.id for m in client.models.list().data]
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        raise ConnectionError(f"cannot reach {base_url}/models ({e}): is the server running?") from None
    if not ids:
        raise ValueError(f"{base_url}/models lists no model")
    return ids[0]


def resolve_model(spec: str) -> ModelSpec:
    """An HF folder -> Inspect's `hf/` provider; an http(s) URL -> Inspect's OpenAI-compatible provider; anything else
    is taken as an Inspect model name (e.g. `openai/gpt-4o-mini`, `google/gemini-2.5-flash-lite`)."""
    if spec.startswith(("http://", "https://")):
        base_url = spec.rstrip("/")
        return ModelSpec(name=f"openai-api/docmix/{served_model_id(base_url)}", base_url=base_url)
    path = storage.absolute(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory without config.json: pass an exported HF folder (MODEL_DIR/hf) "
                             "or serve a checkpoint with `python -m eval.serve` and pass its URL")
        # Inspect's hf provider (transformers) loads local folders only: a gs:// export is copied here first.
        return ModelSpec(name=f"hf/{storage.local_dir(path)}", hf_dir=path)
    if storage.is_remote(spec) or "/" not in spec or spec.startswith((".", "/", "~")):
        raise ValueError(f"{spec!r} is neither an existing HF folder, an http(s) URL nor an Inspect model name (provider/model)")
    return ModelSpec(name=spec)


def build_local_task(data: anima_data.LocalAnima, revision: str, grader: Model) -> inspect_ai.Task:
    """The task `inspect_evals.anima.anima` builds, over a local dataset copy (same solver, scorer and metrics)."""
    dims = data.dims_by_name
    return inspect_ai.Task(
        dataset=list(data.samples),
        solver=generate(),
        metrics=[overall_mean(), dimension_normalized_avg(dims), avg_by_dimension()],
        scorer=anima_scorer(dimensions=dims, revision=revision, grader_models=[grader]),
        name="anima",
    )


def _finite(value: float) -> float | None:
    # No parseable grade at all gives NaN; JSON has no NaN, and null says "not measured".
    return None if math.isnan(value) else value


def summarize(log: EvalLog) -> dict[str, Any]:
    """overall_mean, dimension_normalized_avg, per-dimension means and grading counts from a finished Inspect log."""
    if log.status != "success" or log.results is None:
        raise RuntimeError(f"ANIMA eval ended with status {log.status!r}: {log.error.message if log.error else 'no results'}")
    metrics = {name: m.value for s in log.results.scores for name, m in s.metrics.items()}
    scores = [next(iter(s.scores.values())) for s in log.samples or [] if s.scores]
    return {
        "overall_mean": _finite(metrics["overall_mean"]),
        "dimension_normalized_avg": _finite(metrics["dimension_normalized_avg"]),
        # avg_by_dimension is a dict-valued metric; Inspect stores one metric per dimension under its name.
        "dimensions": {name: metrics[name] for name in sorted(metrics) if name not in NON_DIMENSION_METRICS},
        "n_samples": len(log.samples or []),
        "n_scored": sum(isinstance(s.value, dict) for s in scores),
        "grades_attempted": sum((s.metadata or {}).get("grades_attempted", 0) for s in scores),
        "grades_unparseable": sum((s.metadata or {}).get("grades_unparseable", 0) for s in scores),
        "log": str(log.location),
    }


def check_reachable(spec: ModelSpec, flag: str, timeout_s: int = 60) -> None:
    """One one-token request to a hosted or served model before the eval, so an unreachable service or a missing key
    is one clear error (exit 3, exit_codes) instead of an eval that retries for hours. Uses its own Model instance
    (its HTTP client belongs to this check's event loop, not the eval's)."""
    import asyncio

    model = spec.model(memoize=False)
    try:
        asyncio.run(model.generate("Say OK.", config=GenerateConfig(max_tokens=1, max_retries=1, timeout=timeout_s)))
    except Exception as e:  # noqa: BLE001 -- every provider has its own error types; the message is what helps
        last = getattr(e, "last_attempt", None)  # tenacity's RetryError wraps the provider's error
        cause = last.exception() if last is not None and last.exception() is not None else e
        where = getattr(getattr(model, "api", None), "base_url", None)
        raise ConnectionError(f"{flag} {model}{f' at {where}' if where else ''}: cannot get a completion "
                              f"({type(cause).__name__}: {cause})") from None


def _build(spec: ModelSpec, config: GenerateConfig, flag: str, role: str | None) -> Model:
    try:
        return spec.model(config, role)
    except Exception as e:  # Inspect's PrerequisiteError: an API key or a provider package missing (rich markup)
        if type(e).__name__ != "PrerequisiteError":
            raise
        paragraphs = re.sub(r"\[/?[a-z ]+\]", "", str(e)).removeprefix("ERROR: ").split("\n\n")
        text = ": ".join(" ".join(p.split()) for p in paragraphs if p.strip())
        raise exit_codes.ServiceUnavailable(f"{flag} {spec.name}: {text}") from None


def run(model: str | Model, grader: str | Model, *, dataset_dir: str | pathlib.Path | None = None, epochs: int = 5,
        limit: int | None = None, languages: Sequence[str] | None = None, max_tokens: int | None = None,
        temperature: float | None = None, grader_max_tokens: int | None = None,
        grader_temperature: float | None = None, log_dir: str | pathlib.Path | None = None,
        out: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Runs ANIMA on `model` graded by `grader` (specs as in `resolve_model`, or Inspect Models), writes the result
    JSON (`out`, default `anima.json` where eval.loading.results_dir puts the HF folder's results) and returns it.

    The cheap checks come first, so that bad input, a missing API key or extra and an unreachable service are each
    one error before a local model is loaded: the arguments and the dataset copy, then hosted models (built and asked
    for one token), then HF folders."""
    given = {"--model": model, "--grader": grader}
    configs = {"--model": GenerateConfig(max_tokens=max_tokens, temperature=temperature),
               "--grader": GenerateConfig(max_tokens=grader_max_tokens, temperature=grader_temperature)}
    specs = {flag: resolve_model(m) for flag, m in given.items() if isinstance(m, str)}
    hf_dir = specs["--model"].hf_dir if "--model" in specs else None
    if out is None and hf_dir is None:
        raise ValueError(f"--out is required when --model is not an HF folder (got {model!r})")
    out_path = storage.Path(out) if out else loading.results_dir(hf_dir) / RESULT_FILE
    data = anima_data.load(dataset_dir, languages) if dataset_dir else None
    built = {flag: m for flag, m in given.items() if isinstance(m, Model)}
    for flag in sorted(specs, key=lambda f: specs[f].local):  # hosted models first
        built[flag] = _build(specs[flag], configs[flag], flag, role="grader" if flag == "--grader" else None)
        if not specs[flag].local:
            check_reachable(specs[flag], flag)
    target, grader_model = built["--model"], built["--grader"]
    if data is not None:
        revision = f"local-{data.files_sha256['questions.jsonl'][:12]}"
        task = build_local_task(data, revision, grader_model)
        dataset = {"source": "local", "dir": str(storage.absolute(dataset_dir)), "sha256": data.files_sha256,
                   "ignored_tags": {str(k): list(v) for k, v in data.ignored_tags.items()}}
    else:
        revision = DATASET_DEFAULT_REVISION
        task = hub_anima_task(grader_models=[grader_model], languages=list(languages) if languages else None)
        dataset = {"source": "hub", "repo_id": DATASET_REPO_ID, "revision": revision}
    log_dir = storage.Path(log_dir) if log_dir else out_path.parent / "anima_logs"
    with tempfile.TemporaryDirectory(prefix="docmix-anima-logs-") as tmp:
        local = tmp if storage.is_remote(log_dir) else str(log_dir)  # Inspect writes local files; uploaded after
        (log,) = inspect_ai.eval(task, model=target, epochs=epochs, limit=limit, log_dir=local, display="none",
                                 fail_on_error=True, score_display=False)
        summary = summarize(log)
        if local != str(log_dir):
            storage.upload_tree(local, log_dir)
            summary["log"] = summary["log"].replace(local, str(log_dir), 1)
    result = {
        "model": str(model), "inspect_model": str(target), "grader": str(grader_model), "dataset": dataset,
        "revision": revision, "epochs": epochs, "limit": limit, "languages": list(languages) if languages else None,
        "max_tokens": max_tokens, "temperature": temperature,
        **summary,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.anima", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, OpenAI-compatible base URL (…/v1) or Inspect model name")
    p.add_argument("--grader", required=True, help="Inspect model name, HF folder or OpenAI-compatible base URL")
    p.add_argument("--dataset_dir", help="local copy with questions.jsonl + dimensions.jsonl (default: the Hub)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--limit", type=int)
    p.add_argument("--languages", nargs="+", help='e.g. English (null language in the data counts as "English")')
    p.add_argument("--max_tokens", type=int, help="generation limit of the evaluated model")
    p.add_argument("--temperature", type=float)
    p.add_argument("--grader_max_tokens", type=int)
    p.add_argument("--grader_temperature", type=float)
    p.add_argument("--log_dir", help="Inspect logs (default: anima_logs/ beside the result file)")
    p.add_argument("--out", help=f"result JSON (default: {RESULT_FILE} beside the checkpoint: MODEL_DIR/eval/hf/ for a run's "
                                         "export, inside any other HF folder)")
    args = p.parse_args(argv)
    result = run(args.model, args.grader, dataset_dir=args.dataset_dir, epochs=args.epochs, limit=args.limit,
                 languages=args.languages, max_tokens=args.max_tokens, temperature=args.temperature,
                 grader_max_tokens=args.grader_max_tokens, grader_temperature=args.grader_temperature,
                 log_dir=args.log_dir, out=args.out)
    print(json.dumps({k: result[k] for k in ("overall_mean", "dimension_normalized_avg", "dimensions", "n_scored")}, indent=2))


if __name__ == "__main__":
    sys.exit(exit_codes.run(main, "python -m eval.anima"))
