"""Hugging Face export of a training run's model, written atomically (a folder that exists is complete)."""
from __future__ import annotations

import os
import pathlib
import shutil

import jax

from models import hf_io
from models.transformer import Transformer


def export(model: Transformer, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
           tokenizer_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes config.json, safetensors and tokenizer files to `out_dir` via a temporary sibling and a rename.

    Only process 0 writes; every process must call it (parameters are gathered to the host tensor by tensor).
    """
    out_dir = pathlib.Path(out_dir)
    if jax.process_index() != 0:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_io.save_pretrained(model, tmp, dtype=dtype, tokenizer_dir=tokenizer_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
