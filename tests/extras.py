"""The optional extras some tests need, and what a test does without one: it is skipped, naming the requirements
file to install, unless CI's `DOCMIX_REQUIRE_<EXTRA>=1` says the extra must be there (then it fails).

Extras only add tests: a run without an extra passes or fails exactly as with it, minus the skipped tests. CI runs
the README's test command first (no seqio or TPU extra: those tests skip), then installs those two extras and runs
the tests marked with them (`pytest -m "seqio or tpu"`, .ci/run).
"""
from __future__ import annotations

import importlib.util
import os

import pytest

# extra -> (modules it provides, the requirements file that installs them)
EXTRAS = {
    "seqio": (("seqio", "tensorflow"), "requirements-seqio.txt"),
    "tpu": (("libtpu",), "requirements-tpu.txt"),
    "gcs": (("gcsfs", "gcp_storage_emulator"), "requirements-test.txt"),
    "eval": (("inspect_ai", "inspect_evals", "openai", "starlette", "uvicorn"), "requirements-eval.txt"),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that are not installed."""
    return [m for m in EXTRAS[extra][0] if importlib.util.find_spec(m) is None]


def why_missing(extra: str) -> str | None:
    """None when `extra` is installed, else the skip reason (raises pytest's failure under DOCMIX_REQUIRE_<EXTRA>=1)."""
    absent = missing(extra)
    if not absent:
        return None
    if os.environ.get(f"DOCMIX_REQUIRE_{extra.upper()}") == "1":
        pytest.fail(f"DOCMIX_REQUIRE_{extra.upper()}=1 but {', '.join(absent)} is not installed "
                    f"(pip install -r {EXTRAS[extra][1]})", pytrace=False)
    return f"the {extra} extra is not installed ({', '.join(absent)}): pip install -r {EXTRAS[extra][1]}"


def require(extra: str) -> pytest.MarkDecorator:
    """For a test module, at the top before importing the extra: `pytestmark = extras.require("tpu")`. Skips the
    module without the extra (or fails, see `why_missing`) and marks its tests with the extra's name (`-m tpu`)."""
    reason = why_missing(extra)
    if reason:
        pytest.skip(reason, allow_module_level=True)
    return getattr(pytest.mark, extra)
