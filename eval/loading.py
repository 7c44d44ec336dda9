"""One entry for every eval tool to load a model (an HF folder, a run directory or a checkpoint step directory), and
the place where eval results of a checkpoint are saved."""
from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Any

import jax

import storage

RESULTS = "eval"
EXPORTS = "exports"  # MODEL_DIR/exports/<step>: the periodic HF exports train.py writes


def is_hf_folder(path: storage.Path) -> bool:
    """An HF folder is recognised by its config.json (run and step directories never hold one at the top)."""
    return (path / "config.json").is_file()


def load_model(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any, storage.Path]:
    """Loads (Transformer, ModelConfig, tokenizer_dir) from `path`.

    `path` is an HF folder (has config.json; its own folder holds the tokenizer), a run directory (its latest checkpoint)
    or a checkpoint step directory, local or gs://. The model's parameters are placed on `mesh` when given.
    """
    path = storage.absolute(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist "
                                "(expected an HF folder, a run directory or a step directory)")
    if is_hf_folder(path):
        from models import hf_io
        from trainer import export

        folder = export.readable(path)  # a gs:// export being replaced: the complete new one
        model, config = hf_io.load_pretrained(folder, mesh=mesh)
        return model, config, folder
    from trainer import checkpoint

    return checkpoint.restore_model(path, mesh=mesh)


def results_dir(path: str | pathlib.Path) -> storage.Path:
    """Where eval results (probes-*.json, heldout.json, anima.json) of the checkpoint at `path` are written.

    Results live outside what training writes, so neither checkpoint garbage collection nor the next export removes
    them or is blocked by them: a step directory MODEL_DIR/checkpoints/N (or a run directory, meaning its latest
    committed step) keeps them in MODEL_DIR/eval/N/, a run's HF export MODEL_DIR/hf (an HF folder beside
    MODEL_DIR/checkpoints) in MODEL_DIR/eval/hf/, a periodic export MODEL_DIR/exports/N (CheckpointConfig.export_every)
    in MODEL_DIR/eval/exports/N/. Any other HF folder keeps them inside itself. Local or gs://.
    """
    path = storage.absolute(path)
    if is_hf_folder(path):
        if (path.parent / "checkpoints").is_dir():
            return path.parent / RESULTS / path.name
        if path.parent.name == EXPORTS and path.name.isdigit() and (path.parent.parent / "checkpoints").is_dir():
            return path.parent.parent / RESULTS / EXPORTS / path.name
        return path
    from trainer import checkpoint

    run_dir, _, step, _ = checkpoint.read_metadata(path)
    return run_dir / RESULTS / str(step)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None) -> Iterator[None]:
    """`jax.set_mesh(mesh)` when a mesh is given (activation sharding constraints need it), else nothing."""
    if mesh is None:
        yield
    else:
        with jax.set_mesh(mesh):
            yield
