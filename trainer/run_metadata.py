"""What a checkpoint records about the run that wrote it, and the check that a resume matches it.

A resume with another model (any Hugging Face field), another tokenizer (sha256 of tokenizer.json), another row length
or batch size is refused with a message that names every difference: continuing would silently train a different
network or tokenize differently. Mixture weights and components may change (data.pipeline continues each component by
name and re-anchors its block grid; docs/data.md); the code version is recorded, and a difference is only logged.

The optimizer settings and TRAIN_STEPS are recorded too, since the learning-rate schedule depends on both: a resume
that would change the learning rate of the remaining steps (or any other optimizer setting) is refused, unless it
starts a new schedule phase at the resumed step (OptimizerConfig.schedule_start = that step; docs/training.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import subprocess
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import exit_codes
import repo
import storage
from data import fingerprint, tokenize
from data.config import MixtureConfig
from models import hf_io
from models.config import ModelConfig, RopeScaling
from trainer import optimizer as optimizer_lib
from trainer.checkpoint_tree import LAYOUT
from trainer.run_config import OptimizerConfig

log = logging.getLogger(__name__)


class CheckpointMismatch(RuntimeError):
    """The checkpoint in MODEL_DIR was written by a different model, tokenizer or data configuration."""
    exit_code = exit_codes.USAGE


def copy_tokenizer(tokenizer: str | pathlib.Path, model_dir: str | pathlib.Path) -> storage.Path:
    """Copies tokenizer.json and its companions (`hf_io.TOKENIZER_FILES`, and generation_config.json, whose
    end-of-sequence ids `eval.chat.load` reads) into MODEL_DIR/tokenizer/ (local or gs://)."""
    tok_file = tokenize.tokenizer_files(tokenizer)[0]
    out = storage.Path(model_dir) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    # The configured file may have any name; it is always the run's tokenizer.json, never a neighbour of that name.
    storage.copy_file(tok_file, out / "tokenizer.json")
    for name in (*hf_io.TOKENIZER_FILES[1:], "generation_config.json"):
        if (tok_file.parent / name).is_file():
            storage.copy_file(tok_file.parent / name, out / name)
    return out


def code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


def build(model: ModelConfig, mixture: MixtureConfig, *, step: int, tokens_seen: dict[str, int],
          optimizer: OptimizerConfig | None = None, train_steps: int | None = None,
          data_fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able metadata item saved with every checkpoint (`optimizer` also records `train_steps`;
    `data_fingerprint` is data.fingerprint.fingerprint of the mixture, checked by `check_data` on resume)."""
    return {
        "data_fingerprint": data_fingerprint,
        "optimizer": None if optimizer is None else
        json.loads(json.dumps({**dataclasses.asdict(optimizer), "train_steps": train_steps})),
        "step": int(step),
        "model_config": model_config_to_dict(model),
        "tokenizer_sha256": tokenize.tokenizer_sha256(mixture.tokenizer),
        "mixture": {"components": [c.name for c in mixture.active_components],
                    "weights": dict(mixture.weights), "stages": [[start, dict(w)] for start, w in mixture.stages],
                    "seq_len": mixture.seq_len, "batch_size": mixture.batch_size},
        "tokens_seen": {k: int(v) for k, v in tokens_seen.items()},
        "code_version": code_version(),
        "layout": LAYOUT,
        "scan_layers": model.scan_layers,
    }


def for_params_only(model: ModelConfig, tokenizer_dir: str | pathlib.Path | None, source: str) -> dict[str, Any]:
    """Metadata of a params-only checkpoint (trainer.convert): no mixture, no data or optimizer state."""
    return {"step": 0, "model_config": model_config_to_dict(model),
            "tokenizer_sha256": tokenize.tokenizer_sha256(tokenizer_dir) if tokenizer_dir else None, "mixture": None,
            "tokens_seen": {}, "code_version": code_version(), "layout": LAYOUT, "scan_layers": model.scan_layers,
            "source": source}


def check(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raises CheckpointMismatch listing every difference that makes resuming `where` unsafe."""
    if saved.get("mixture") is None:
        raise CheckpointMismatch(f"{where} holds parameters only (written by trainer.convert) and cannot be resumed; "
                                 "start a run from it with --gin.TrainConfig.init_from=<that run dir>")
    problems = []
    if saved.get("layout") != LAYOUT:
        problems.append(f"layout {saved.get('layout')!r} (this code reads {LAYOUT!r})")
    old_hf = model_config_from_dict(saved["model_config"]).to_hf()
    new_hf = model_config_from_dict(current["model_config"]).to_hf()
    problems += [f"model {k}: checkpoint {old_hf.get(k)!r}, config {new_hf.get(k)!r}"
                 for k in sorted(set(old_hf) | set(new_hf)) if old_hf.get(k) != new_hf.get(k)]
    if saved["tokenizer_sha256"] != current["tokenizer_sha256"]:
        problems.append(f"tokenizer sha256: checkpoint {saved['tokenizer_sha256'][:12]}, "
                        f"config {current['tokenizer_sha256'][:12]}")
    for key in ("seq_len", "batch_size"):
        if saved["mixture"][key] != current["mixture"][key]:
            problems.append(f"mixture {key}: checkpoint {saved['mixture'][key]!r}, config {current['mixture'][key]!r}")
    if problems:
        raise CheckpointMismatch(
            f"{where} was written by a different run configuration and cannot be resumed:\n  - "
            + "\n  - ".join(problems)
            + "\nUse a new MODEL_DIR, or start a new run from it with --gin.TrainConfig.init_from=<that run dir>.")
    old, new = (schedule(m["mixture"]) for m in (saved, current))
    if old != new:  # data.pipeline re-anchors its block grid
        log.warning("resuming %s with new mixture weights %s (checkpoint: %s); see docs/data.md", where, new, old)
    if saved.get("code_version") != current.get("code_version"):
        log.info("resuming %s written by code %s with code %s", where, saved.get("code_version"),
                 current.get("code_version"))


def schedule(mixture: dict[str, Any]) -> list[list]:
    """[[start_step, weights], ...] of a metadata record's mixture, the first at step 0."""
    return [[0, mixture["weights"]], *mixture.get("stages", [])]


def check_data(saved: dict[str, Any], current: dict[str, Any], where: str, allow_change: bool) -> None:
    """Refuses (CheckpointMismatch, one line) a resume whose corpora differ from the checkpoint's
    (data.fingerprint.changes), unless `allow_change` (TrainConfig.allow_data_change): then it logs what changed."""
    if not saved.get("data_fingerprint"):
        log.info("%s records no data fingerprint: the corpora are not checked against it", where)
        return
    changed = fingerprint.changes(saved["data_fingerprint"], current["data_fingerprint"] or {})
    if not changed:
        return
    if allow_change:
        log.warning("resuming %s on changed data (TrainConfig.allow_data_change): %s", where, "; ".join(changed))
        return
    raise CheckpointMismatch(f"{where} was trained on other data: {'; '.join(changed)}. Resuming would continue its "
                             "data position in other documents; restore the files, or add "
                             "--gin.TrainConfig.allow_data_change=True if the change is intended")


SCHEDULE_FIELDS = ("learning_rate", "schedule", "warmup_steps", "min_lr_ratio", "decay_fraction", "schedule_start",
                   "train_steps")


def _learning_rates(record: dict[str, Any], steps: np.ndarray) -> np.ndarray:
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    config = OptimizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in fields})
    return np.asarray(jax.vmap(optimizer_lib.schedule(config, record["train_steps"]))(jnp.asarray(steps)))


def check_optimizer(saved: dict[str, Any], current: dict[str, Any], step: int, where: str) -> None:
    """Refuses (CheckpointMismatch) a resume at `step` whose optimizer settings differ from the checkpoint's in a way
    that changes training: another learning rate at any remaining step, or any other setting. A new schedule phase
    (current schedule_start == `step`) is accepted and logged."""
    old, new = saved.get("optimizer"), current["optimizer"]
    if old is None:
        log.warning("%s records no optimizer settings (written by older code): the learning-rate schedule of the "
                    "resumed run is not checked against it", where)
        return
    if old == new:
        return
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    describe = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    if new["schedule_start"] == step:
        log.warning("resuming %s with a new schedule phase from step %d: %s", where, step, describe)
        return
    problems = [f"optimizer {k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}"
                for k in changed if k not in SCHEDULE_FIELDS]
    remaining = np.arange(step, max(new["train_steps"], step))
    old_lr, new_lr = _learning_rates(old, remaining), _learning_rates(new, remaining)
    differ = np.flatnonzero(~np.isclose(old_lr, new_lr, rtol=1e-6, atol=0.0))
    if differ.size:
        i = int(differ[0])
        problems.append(f"learning-rate schedule ({', '.join(k for k in changed if k in SCHEDULE_FIELDS)}): at step "
                        f"{remaining[i] + 1} the checkpoint's schedule gives {old_lr[i]:.4g}, this config {new_lr[i]:.4g}")
    if not problems:
        log.info("resuming %s with %s: the learning rate of the remaining steps is unchanged", where, describe)
        return
    keep = " ".join(f"--gin.{'TRAIN_STEPS' if k == 'train_steps' else 'OptimizerConfig.' + k}={old.get(k)!r}"
                    for k in changed)
    raise CheckpointMismatch(
        f"{where} was trained with other optimizer settings; resuming would silently change them:\n  - "
        + "\n  - ".join(problems)
        + f"\nTo continue the checkpoint's schedule, use its settings: {keep}\n"
        f"To continue with the new settings as a new schedule phase from step {step} (warmup, then the schedule over "
        f"the remaining steps; docs/training.md), add --gin.OptimizerConfig.schedule_start={step}")
