"""What the processes of a multi-process run check together before any work, each ending every process with one line
(exit 2) before anything is read or compiled:
- `same_config`: every process was given the same configuration. Each publishes its operative config (the gin text
  RunConfig.gin_text plus train.py's flags that change the program and the code version) or the error loading it;
  a difference names the bindings that differ ("TRAIN_STEPS = 4 on process 0, 8 on process 1"). Without this, two
  processes given different arguments train with different learning rates, then wait for each other forever.
- `shared_model_dir`: MODEL_DIR is the same storage on every process. Process 0 writes a file with a random name
  into it; every other process reads it back and writes one of its own. A local path on hosts that do not share a
  disk (or a relative path resolved from different working directories) fails here, not when each host has written
  its part of a checkpoint somewhere else.
"""
from __future__ import annotations

import json
import socket
import uuid

import jax

import storage
from trainer import consensus

CHECK_FILE = ".docmix_shared_check"
SHOWN = 4  # differing bindings named in the message


class PodMismatch(ValueError):
    """The processes of a run were not started alike (configuration, storage); the message names the difference."""


def bindings(text: str) -> dict[str, str]:
    """{binding: value} of an operative config's `NAME = VALUE` lines (gin continues long values on indented lines)."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line[:1].isspace() and name is not None:
            out[name] += " " + line.strip()
        elif " = " in line and not line.startswith("#"):
            name, value = line.split(" = ", 1)
            out[name.strip()] = value.strip()
        else:
            name = None
    return out


def same_config(operative: str | None, error: BaseException | None) -> None:
    """Agrees that every process loaded the same `operative` config text (None with the `error` that stopped loading
    it, re-raised here). Raises PodMismatch naming the first process that differs from process 0 and the bindings."""
    mine = {"error": f"{type(error).__name__}: {error}"} if error is not None else {"config": operative}
    records = [json.loads(v) for v in consensus.gather(json.dumps(mine))]
    if error is not None:
        raise error
    failed = [(i, r["error"]) for i, r in enumerate(records) if "error" in r]
    if failed:
        index, text = failed[0]
        raise PodMismatch(f"process {index} of {len(records)} could not load the configuration: {text}")
    reference = records[0]["config"]
    other = next((i for i, r in enumerate(records) if r["config"] != reference), None)
    if other is None:
        return
    a, b = bindings(reference), bindings(records[other]["config"])
    differ = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    shown = "; ".join(f"{k} = {a.get(k, '(unset)')} on process 0, {b.get(k, '(unset)')} on process {other}"
                      for k in differ[:SHOWN])
    more = f" (and {len(differ) - SHOWN} more)" if len(differ) > SHOWN else ""
    raise PodMismatch(f"the processes were given different configurations: {shown or 'their texts differ'}{more}; "
                      "start every process with the same arguments")


def operative(gin_text: str, flags: dict[str, object], code_version: str) -> str:
    """The text `same_config` compares: the gin config, the train.py flags that change the program, the code."""
    lines = [f"train.py --{name} = {value!r}" for name, value in sorted(flags.items())]
    return "\n".join([gin_text.rstrip(), *lines, f"code version = {code_version}"]) + "\n"


def shared_model_dir(model_dir: str) -> None:
    """Agrees that `model_dir` is one storage for every process (see the module docstring); raises PodMismatch."""
    path = storage.Path(model_dir)

    def write_probe() -> str:
        path.mkdir(parents=True, exist_ok=True)
        name = f"{CHECK_FILE}.{uuid.uuid4().hex}"
        (path / name).write_text(name)
        return name

    name = consensus.from_process_0("writing a test file into MODEL_DIR", write_probe)
    problem = ""
    if jax.process_index() != 0:
        try:
            found = (path / name).read_text() if (path / name).exists() else None
            if found != name:
                problem = "cannot find the file process 0 wrote into it"
            else:
                (path / f"{name}.{jax.process_index()}").write_text(name)
                (path / f"{name}.{jax.process_index()}").unlink()
        except OSError as e:
            problem = f"cannot read or write it ({type(e).__name__}: {e})"
    seen = [json.loads(v) for v in consensus.gather(json.dumps(
        {"where": f"{socket.gethostname()}:{storage.absolute(path)}", "problem": problem}))]
    if jax.process_index() == 0:
        (path / name).unlink(missing_ok=True)
    bad = [(i, s) for i, s in enumerate(seen) if s["problem"]]
    if bad:
        index, s = bad[0]
        raise PodMismatch(f"MODEL_DIR={model_dir} is not the same storage on every process: process {index} of "
                          f"{len(seen)} {s['problem']} (process 0 resolves MODEL_DIR to {seen[0]['where']}, process "
                          f"{index} to {s['where']}); give every host the same MODEL_DIR on shared storage, e.g. a "
                          "gs:// bucket")
