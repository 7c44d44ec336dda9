"""Hugging Face export of a training run's model: never replaces anything but an earlier export, never half-written.

An export folder carries a marker file (EXPORT_MARKER) listing the files it wrote. `check_target` accepts a missing
folder or an empty one; an earlier export only with `overwrite` (train.py's own exports pass it: a rerun re-exports
MODEL_DIR/hf), and only while it holds nothing but the files its marker lists. Anything else — a user's folder, a
run directory, a folder with checkpoints — is refused before any parameters are read. The new export is written to a
temporary sibling and swapped in by renames, so a crash leaves either the old export or the new one at `out_dir`.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import jax
from jax.experimental import multihost_utils

import storage
from models import hf_io
from models.transformer import Transformer

EXPORT_MARKER = "docmix_export.json"


class UnsafeExportTarget(FileExistsError):
    """The export folder exists and is not an earlier export that may be replaced."""


def _written_files(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}


def check_target(out_dir: str | pathlib.Path, *, overwrite: bool) -> None:
    """Raises UnsafeExportTarget unless exporting to `out_dir` cannot replace anything but an earlier export."""
    if storage.is_remote(out_dir):
        return _check_remote_target(storage.Path(out_dir), overwrite=overwrite)
    out_dir = pathlib.Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise UnsafeExportTarget(f"{out_dir} exists and is not a folder; choose another export path")
    present = {p.name for p in out_dir.iterdir()}
    if not present:
        return
    marker = out_dir / EXPORT_MARKER
    if "checkpoints" in present or not marker.is_file():
        raise UnsafeExportTarget(
            f"{out_dir} already exists and is not a docmix export (no {EXPORT_MARKER}"
            f"{'; it holds checkpoints' if 'checkpoints' in present else ''}); nothing was written. Choose a new or "
            "empty folder: an export never replaces anything else")
    try:
        listed = set(json.loads(marker.read_text())["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise UnsafeExportTarget(f"{marker}: unreadable export marker ({e}); not replacing {out_dir}") from e
    extra = sorted(_written_files(out_dir) - listed - {EXPORT_MARKER})
    if extra:
        raise UnsafeExportTarget(f"{out_dir} is an earlier export but also holds files it did not write "
                                 f"({', '.join(extra[:5])}); not replacing it. Move them, or export elsewhere")
    if not overwrite:
        raise UnsafeExportTarget(f"{out_dir} holds an earlier export; pass --overwrite to replace it")


def _check_remote_target(out_dir: storage.Path, *, overwrite: bool) -> None:
    """check_target for gs:// (no symlinks; a folder is a prefix): only an earlier export (its marker) is replaced.
    The stray-file check of local folders is not made here (a recursive listing of a bucket prefix)."""
    present = {p.name for p in out_dir.iterdir()} if out_dir.exists() else set()
    if present and ("checkpoints" in present or EXPORT_MARKER not in present):
        raise UnsafeExportTarget(f"{out_dir} already exists and is not a docmix export (no {EXPORT_MARKER}); nothing "
                                 "was written. Choose a new or empty folder: an export never replaces anything else")
    if present and not overwrite:
        raise UnsafeExportTarget(f"{out_dir} holds an earlier export; pass --overwrite to replace it")


def export(model: Transformer, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
           tokenizer_dir: str | pathlib.Path | None = None, overwrite: bool = False,
           source: str | None = None) -> pathlib.Path:
    """Writes config.json, safetensors, tokenizer files and EXPORT_MARKER to `out_dir` (see the module doc).

    Every process must call it: parameters are gathered collectively, tensor by tensor; process 0 writes, and every
    process returns once the folder is in place.
    """
    check_target(out_dir, overwrite=overwrite)
    if storage.is_remote(out_dir):
        return _export_remote(model, storage.Path(out_dir), dtype=dtype, tokenizer_dir=tokenizer_dir, source=source)
    out_dir = pathlib.Path(out_dir)
    if jax.process_index() != 0:
        hf_io.save_pretrained(model, None, dtype=dtype)  # takes part in every gather, writes nothing
        return _in_place(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        hf_io.save_pretrained(model, tmp, dtype=dtype, tokenizer_dir=tokenizer_dir)
        _write_marker(tmp, dtype, source)
        check_target(out_dir, overwrite=overwrite)  # again: the folder may have changed while we wrote
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, never the target
        raise
    return _in_place(out_dir)


def _in_place(out_dir: "pathlib.Path | storage.Path") -> "pathlib.Path | storage.Path":
    """`out_dir`, once every process got here (process 0 after writing it)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"docmix export {out_dir}")
    return out_dir


def _write_marker(folder: pathlib.Path, dtype: str, source: str | None) -> None:
    marker = {"format": "docmix Hugging Face export", "dtype": dtype, "source": source,
              "files": sorted(_written_files(folder))}
    (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _export_remote(model: Transformer, out_dir: storage.Path, *, dtype: str, tokenizer_dir, source) -> storage.Path:
    """gs:// has no rename: written locally, the earlier export (checked) removed, then uploaded with config.json
    and the marker last, so a folder that loaders recognise is complete."""
    if jax.process_index() != 0:
        hf_io.save_pretrained(model, None, dtype=dtype)  # takes part in every gather, writes nothing
        return _in_place(out_dir)
    with tempfile.TemporaryDirectory(prefix="docmix-export-") as tmp:
        hf_io.save_pretrained(model, tmp, dtype=dtype, tokenizer_dir=tokenizer_dir)
        _write_marker(pathlib.Path(tmp), dtype, source)
        if out_dir.exists():
            out_dir.rmtree()
        storage.upload_tree(tmp, out_dir, last=("config.json", EXPORT_MARKER))
    return _in_place(out_dir)


def _swap_in(new: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Replaces `out_dir` (absent, empty, or an earlier export checked by check_target) with `new`."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(new, out_dir)  # a rename onto an empty folder replaces it
        return
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.replaced-", dir=out_dir.parent))
    os.replace(out_dir, old / "export")  # a crash here leaves the earlier export complete, under `old`
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(old / "export", out_dir)
        raise
    shutil.rmtree(old)
