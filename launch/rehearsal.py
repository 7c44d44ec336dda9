"""A TPU launch rehearsed on this machine: `python -m launch.tpu --rehearse=N <the launch's flags> -- <train args>`.

The same launcher, flags and train command as the real launch run against a local stand-in of each thing a TPU VM
has: the cloud (launch.local_cloud: N workers per node, each with its own empty home and working directory, no
shared local disk), the bucket (launch.emulator: a GCS emulator serving every gs:// path of the command, started
here unless STORAGE_EMULATOR_HOST already names one) and the model (a small one). Before the launch the rehearsal
puts in the bucket what the command reads and is not there yet (it never replaces an object): at INIT_FROM a small
model's Hugging Face folder (models/tiny.gin's network, random weights, the demo tokenizer), at the run's data
paths and tokenizer the demo's text, instructions and tokenizer. A run whose network is not INIT_FROM's gets
models/tiny.gin after its own gin files. The train command keeps every argument and gets these last: at most 8
steps of BATCH_SIZE = 4 rows per worker of 64 tokens, mixture blocks of 20 rows, a checkpoint every 2 steps, one
microbatch, no held-out evaluation. During the run the cloud drops the SSH connection that starts the job (the
job runs on) and preempts the slice once the job has logged half of its steps; the run is relaunched, resumes from
its checkpoint in the bucket and ends with its export. Exit status: the launch's, or 1 when it did not reach its
last step or its export.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import repo
from launch import cloud, emulator, job, local_cloud, tpu
from launch.launcher import Options

MAX_STEPS, ROWS_PER_WORKER, SEQ, DEVICES = 8, 4, 64, 2


def run_facts(train_args: Sequence[str]) -> dict[str, Any]:
    """What the rehearsal needs to know of the train command, from its parsed gin config (nothing is read), after
    the real launch's checks of its paths."""
    from trainer import config

    model_dir, init_from = tpu.run_paths(train_args)  # leaves the command's config parsed
    data = []  # (paths, format) of each mixture component
    for ref in config.bound("MixtureConfig.components") or ():
        scope = ref.scoped_selector.rsplit("/", 1)[0] if "/" in ref.scoped_selector else ""
        prefix = f"{scope}/" if scope else ""
        data.append((tuple(config.bound(f"{prefix}Component.paths") or ()),
                     config.bound(f"{prefix}Component.format") or "text"))
    tokenizer = config.bound("MixtureConfig.tokenizer")
    return {"model_dir": model_dir, "init_from": init_from, "train_steps": config.bound("TrainConfig.train_steps"),
            "data": data, "tokenizer": tokenizer if isinstance(tokenizer, str) else None,
            "model_from_init": "model_from_init" in str(config.bound("RunConfig.model"))}


def overrides(facts: dict[str, Any], workers: int) -> list[str]:
    return ([] if facts["model_from_init"] else ["--gin_file=models/tiny.gin"]) + [
        f"--gin.TRAIN_STEPS={min(facts['train_steps'] or MAX_STEPS, MAX_STEPS)}",
        f"--gin.BATCH_SIZE={ROWS_PER_WORKER * workers}", f"--gin.SEQ_LEN={SEQ}", "--gin.CHECKPOINT_EVERY=2",
        "--gin.TrainConfig.microbatches=1", "--gin.MixtureConfig.block_size=20",
        "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=None", "--gin.RunConfig.eval_mixture=None",
        "--gin.TrainConfig.peak_flops=1e12", "--gin.TrainConfig.progress_bar=False"]


def buckets(train_args: Sequence[str]) -> list[str]:
    return sorted(set(re.findall(r"gs://([^/\s'\"]+)", " ".join(train_args))))


@contextlib.contextmanager
def bucket_server(names: Sequence[str]) -> Iterator[str]:
    """The GCS emulator named by STORAGE_EMULATOR_HOST (its missing buckets created), or a new one."""
    url = os.environ.get("STORAGE_EMULATOR_HOST")
    if url:
        with contextlib.suppress(OSError):  # an existing bucket is refused; it is there, which is all we need
            emulator.create_buckets(url, names)
        yield url
        return
    with emulator.emulator(names) as url:
        yield url


def _absent(pattern: str) -> bool:
    import storage

    folder, _, glob = pattern.rpartition("/")
    return not any(storage.Path(folder).glob(glob)) if any(c in glob for c in "*?[") else \
        not storage.Path(pattern).exists()


def _put(pattern: str, lines: list[str]) -> str:
    """Writes `lines` to a file that `pattern` (a path or a glob) matches; its path."""
    import storage

    folder, _, glob = pattern.rpartition("/")
    name = re.sub(r"\[[^]]*]", "x", glob).replace("*", "rehearsal").replace("?", "x")
    target = storage.Path(folder) / name
    text = "".join(line + "\n" for line in lines).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    return str(target)


def small_model(folder: pathlib.Path) -> pathlib.Path:
    """A Hugging Face folder of models/tiny.gin's network with random weights and the demo tokenizer."""
    from flax import nnx

    from models import hf_io
    from models.transformer import Transformer
    from trainer import config
    from trainer.demo_assets import demo_asset

    run = config.load(["runs/demo.gin", "models/tiny.gin"], ["MODEL_DIR='unused'"])
    hf_io.save_pretrained(Transformer(run.model, rngs=nnx.Rngs(0)), folder, dtype="float32",
                          tokenizer_dir=demo_asset("tokenizer"))
    return folder


def stage(facts: dict[str, Any], tmp: pathlib.Path) -> list[str]:
    """Puts what the run reads into the bucket where nothing is there yet; what it put, one line each."""
    import storage
    from trainer.demo_assets import demo_asset

    done = []
    if facts["init_from"] and not storage.Path(facts["init_from"], "config.json").exists():
        storage.upload_tree(small_model(tmp / "small_model"), facts["init_from"], last=("config.json",))
        done.append(f"a small model (models/tiny.gin, random weights) at INIT_FROM={facts['init_from']}")
    tokenizer = facts["tokenizer"]
    if tokenizer and tokenizer.startswith("gs://") and tokenizer != facts["init_from"] and \
            not storage.Path(tokenizer, "tokenizer.json").exists():
        storage.upload_tree(demo_asset("tokenizer"), tokenizer)
        done.append(f"the demo tokenizer at {tokenizer}")
    for paths, fmt in facts["data"]:
        source = demo_asset("instructions" if fmt in ("chat", "alpaca") else "replay")
        lines = pathlib.Path(source).read_text().splitlines()[:400]
        if fmt == "alpaca":
            lines = [json.dumps({"instruction": m["messages"][0]["content"], "input": "",
                                 "output": m["messages"][1]["content"]}) for m in map(json.loads, lines)]
        for pattern in paths:
            if str(pattern).startswith("gs://") and _absent(pattern):
                done.append(f"{len(lines)} demo records at {_put(pattern, lines)}")
    return done


def run(s: cloud.Slice, workers: int, max_relaunches: int, train_args: Sequence[str]) -> int:
    """The rehearsal of launching `train_args` on slice `s`, with `workers` workers per node."""
    if workers < 1:
        raise ValueError(f"--rehearse={workers}: the number of workers must be at least 1")
    facts = run_facts(train_args)
    model_dir = facts["model_dir"]
    rehearsed = [*train_args, *overrides(facts, workers)]
    steps = min(facts["train_steps"] or MAX_STEPS, MAX_STEPS)
    with tempfile.TemporaryDirectory(prefix="docmix-rehearsal-") as tmp, bucket_server(buckets(rehearsed)) as url:
        tmp = pathlib.Path(tmp)
        print(f"rehearsal: {workers} worker(s) per node, GCS emulator at {url}, a local cloud in {tmp}")
        for line in stage(facts, tmp):
            print(f"rehearsal: put {line}")
        root = tmp / "cloud"
        root.mkdir()
        faults = [{"kind": "ssh_drop", "phase": "start"}, {"kind": "preempt", "phase": "train", "step": steps // 2}]
        (root / "cloud.json").write_text(json.dumps({"workers": workers, "devices": DEVICES, "faults": faults,
                                                     "env": emulator.client_env(url)}))
        local_cloud.make_bin(root)
        pythonpath = os.pathsep.join(filter(None, [str(repo.ROOT), os.environ.get("PYTHONPATH")]))
        gcloud = cloud.Gcloud(program=[sys.executable, "-m", "launch.local_cloud", f"--root={root}"],
                              env={**os.environ, **emulator.client_env(url), "PYTHONPATH": pythonpath})
        options = Options(max_relaunches=max_relaunches, poll_s=1.0, heartbeat_s=1.0, stale_s=600.0,
                          stop_grace_s=120.0)
        try:
            code = tpu.launch(s, gcloud, model_dir, rehearsed, options, None)
        finally:
            local_cloud.LocalCloud(root).delete_all()  # no job outlives the rehearsal
        fired = json.loads((root / "fired.json").read_text()) if (root / "fired.json").exists() else []
        return verdict(code, model_dir, steps, [faults[i] for i in fired])


def verdict(code: int, model_dir: str, steps: int, fired: list[dict]) -> int:
    import storage

    reached = max((s.get("step") or 0 for s in job.read_states(model_dir).values()), default=0)
    export = storage.Path(model_dir, "hf", "config.json").exists()
    injected = ", ".join(f"{f['kind']} during {f['phase']}" for f in fired) or "none"
    print(f"rehearsal: faults injected: {injected}; last step logged {reached} of {steps}; "
          f"export {'written' if export else 'missing'} ({model_dir}/hf)")
    if code != 0:
        print(f"rehearsal: FAILED (exit status {code})")
        return code
    if reached < steps or not export:
        print("rehearsal: FAILED (the run did not reach its last step and its export)")
        return 1
    print("rehearsal: PASSED: the launch survived an SSH drop and a preemption, resumed, finished and exported")
    return 0
