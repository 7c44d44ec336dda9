"""One entry for every eval tool to load a model: an HF folder, a run directory or one checkpoint step directory."""
from __future__ import annotations

import pathlib
from typing import Any

import jax


def is_hf_folder(path: pathlib.Path) -> bool:
    """An HF folder is recognised by its config.json (run and step directories never hold one at the top)."""
    return (path / "config.json").is_file()


def load_model(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any, pathlib.Path]:
    """Loads (Transformer, ModelConfig, tokenizer_dir) from `path`.

    `path` is an HF folder (has config.json; its own folder holds the tokenizer), a run directory (its latest checkpoint)
    or a checkpoint step directory. The model's parameters are placed on `mesh` when given.
    """
    path = pathlib.Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (expected an HF folder, a run directory or a step directory)")
    if is_hf_folder(path):
        from models import hf_io

        model, config = hf_io.load_pretrained(path, mesh=mesh)
        return model, config, path
    from trainer import checkpoint

    return checkpoint.restore_model(path, mesh=mesh)
