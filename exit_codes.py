"""One exit-code table for every docmix command line, and `run()`, which keeps to it with one-line errors.

| code | meaning |
|---|---|
| 0 | done; for `train.py` also: preempted (SIGTERM, after saving) or the data ran out with `on_exhausted='stop'` |
| 1 | stopped on the numbers or the data: a non-finite loss or gradient norm, a component exhausted with |
|   | `on_exhausted='error'`, `data.synth generate` items that failed for good, `contamination --fail-on-hit` hits, |
|   | runs of `sweep.py` or `experiments.durability` that did not finish, a run `launch.aot` finds too large |
| 2 | usage, configuration or input error, found before any expensive work (a flag, gin binding, file, model folder); |
|   | for `train.py` also another run writing to MODEL_DIR (at start, or taking over this run's lock: this run stops) |
| 3 | an external service or client is missing, unreachable or refuses the client (LLM server, grader, `gs://` |
|   | filesystem client, HTTP 401/403), or another process of a multi-host `train.py` run stopped answering (lost) |
| 4 | internal error (a bug): the traceback is printed; please report it |
| 130 | interrupted (Ctrl-C) |

Errors of kinds 1-3 print one line `PROG: error: MESSAGE` naming the file, binding, tensor or URL at fault; set
`DOCMIX_TRACEBACK=1` to get the traceback as well.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

OK, STOPPED, USAGE, UNAVAILABLE, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 4, 130


class ServiceUnavailable(ConnectionError):
    """An external service (an LLM server, a grader) or the client library it needs is missing or unreachable; the
    message names the URL or package."""


class Failed(Exception):
    """A command's outcome that is an error of the table's kinds 1-3 but no exception of its own (items that failed
    for good, contamination hits, runs of a sweep that did not finish): `raise Failed(code, message)` from main, and
    `run` prints `PROG: error: MESSAGE` and returns `code`."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.exit_code = code


def code_for(error: BaseException) -> int:
    """The exit code of an exception that escaped a command's main()."""
    explicit = getattr(error, "exit_code", None)
    if isinstance(explicit, int):
        return explicit
    if isinstance(error, (ConnectionError, TimeoutError, ImportError)) or type(error).__name__ == "URLError":
        return UNAVAILABLE
    if isinstance(error, (ValueError, OSError)):  # not KeyError/TypeError: those are usually bugs, shown in full
        return USAGE
    return INTERNAL


def run(main: Callable[[Sequence[str] | None], Any], prog: str, argv: Sequence[str] | None = None) -> int:
    """Calls `main(argv)` and turns what escapes it into an exit code from the table (a None or non-int result is 0).
    First, on a machine without a TPU, JAX is told not to probe for one (platforms.py)."""
    import platforms

    platforms.skip_tpu_probe()
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- the one place a command line turns exceptions into exit codes
        return report(e, prog)
    return result if isinstance(result, int) and not isinstance(result, bool) else OK


def report(error: Exception, prog: str, code: int | None = None) -> int:
    """Prints `error` as `run` does (one line; the traceback too for a bug or with DOCMIX_TRACEBACK; call it while
    handling the error) and returns its exit code, or `code` where the command knows better (a compiler's rejection
    of a configuration). An error that carries its own code 4 (another process's bug, whose log has the traceback)
    is one line too."""
    code = code_for(error) if code is None else code
    bug = code == INTERNAL and getattr(error, "exit_code", None) != INTERNAL
    if bug or os.environ.get("DOCMIX_TRACEBACK"):
        traceback.print_exc()
    kind = "internal error (a bug; please report it with the traceback above)" if bug else "error"
    print(f"{prog}: {kind}: {message(error)}", file=sys.stderr)
    return code


def message(error: BaseException) -> str:
    """The exception's own text; its type only where the text alone would be unclear (KeyError('x') -> 'x')."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = re.sub(r"\s*\[tensorstore_spec.*$", "", text, flags=re.S)  # Orbax/TensorStore append kilobytes of spec
    if not text or isinstance(error, KeyError):
        return f"{type(error).__name__}: {text}"
    return text
