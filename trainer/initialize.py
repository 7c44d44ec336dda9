"""Where a run's parameters come from when MODEL_DIR has no checkpoint: scratch, a Hugging Face folder, or another
docmix run (a run/step directory or its `hf/` export)."""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

from flax import nnx
from jax.sharding import Mesh

import storage
from models import hf_io
from models.config import ModelConfig
from trainer import checkpoint, export, run_metadata

log = logging.getLogger(__name__)

# Fields that fix the parameter shapes: a mismatch between the gin model and the folder is an error. Other network
# fields (rope theta/scaling, eps, special token ids) are taken from the folder, with a warning when they differ.
SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_embeddings", "qkv_bias", "qk_norm")
RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "scan_layers", "remat", "attention")


def runtime_of(config: ModelConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in RUNTIME_FIELDS}


def reconcile(wanted: ModelConfig, found: ModelConfig, source: str) -> ModelConfig:
    """The folder's network config with the gin runtime fields; raises when a shape-defining field differs."""
    bad = [f"{f}: gin {getattr(wanted, f)!r}, {source} {getattr(found, f)!r}" for f in SHAPE_FIELDS
           if getattr(wanted, f) != getattr(found, f)]
    if bad:
        raise ValueError(f"TrainConfig.init_from={source}: the model config does not match it:\n  - "
                         + "\n  - ".join(bad) + "\nInclude the matching t5x_configs/models/*.gin file.")
    effective = dataclasses.replace(found, **runtime_of(wanted))
    other = [f.name for f in dataclasses.fields(ModelConfig)
             if f.name not in SHAPE_FIELDS + RUNTIME_FIELDS and getattr(wanted, f.name) != getattr(found, f.name)]
    if other:
        log.warning("init_from %s: using its %s (gin config differs)", source,
                    ", ".join(f"{n}={getattr(found, n)!r}" for n in other))
    return effective


def resolve_config(path: str | pathlib.Path, wanted: ModelConfig) -> ModelConfig:
    """The effective ModelConfig of a run initialised from `path` (reads only its config): the folder's network with
    the gin runtime fields. Raises when a shape-defining field differs from `wanted`."""
    path = storage.Path(path)
    if (path / "config.json").is_file():
        found = hf_io.read_config(path, **runtime_of(wanted))
    elif path.exists():
        found = run_metadata.model_config_from_dict(checkpoint.read_metadata(path)[3]["model_config"])
    else:
        raise FileNotFoundError(f"TrainConfig.init_from={path}: no such directory")
    return reconcile(wanted, found, str(path))


def load_params(path: str | pathlib.Path, wanted: ModelConfig, mesh: Mesh) -> tuple[nnx.State, ModelConfig]:
    """(params State placed on `mesh`, effective ModelConfig) from a Hugging Face folder or a docmix run/step dir."""
    path = storage.Path(path)
    config = resolve_config(path, wanted)
    if (path / "config.json").is_file():  # local or gs://: each process reads its rows of each tensor
        model, config = hf_io.load_pretrained(export.readable(path), mesh=mesh, **runtime_of(config))
    else:
        _, ckpt_dir, step, _ = checkpoint.read_metadata(path)
        model = checkpoint.restore_params(ckpt_dir, step, config, mesh)
    return nnx.state(model, nnx.Param), config
