"""Hugging Face export of a training run's model: never replaces anything but an earlier export, and a complete export
can always be read (local or gs://).

An export folder carries a marker file (EXPORT_MARKER) listing the files it wrote. `check_target` accepts a missing
folder or an empty one; an earlier export only with `overwrite` (train.py's own exports pass it: a rerun re-exports
MODEL_DIR/hf), and only while it holds nothing but the files its marker lists (one listing of the folder, local or a
gs:// prefix). Anything else — a user's folder, a run directory, a folder with checkpoints, an export with a file,
a folder (even an empty one; on gs:// a folder's placeholder object) or a symbolic link added — is refused before any
parameters are read, naming what is there, and nothing the marker does not list is ever touched. Files and folders
written locally get the modes the process's umask gives (0644/0755 under umask 022), also the temporary folder that
becomes the export and safetensors' files.

How an earlier export is replaced, and what a reader sees meanwhile:
- local: the new export is written to a temporary sibling `.NAME.writing-*` and swapped in by two renames (the old
  folder to `.NAME.replaced-*`, the new one into place), so `out_dir` holds the old export or the new one; a crash
  between the two renames leaves the old one complete in the hidden sibling. The old export's listed files are then
  deleted and its folder removed once empty.
- gs:// (no rename): the new export is uploaded completely to a sibling prefix `.NAME.writing-<id>/` (its marker
  last). Then the marker in `out_dir` is rewritten to name that prefix under "replacing" (its "files" now list the
  old and the new files), the new files are copied in server-side (config.json last), files only the old export
  listed are deleted, the new marker is written, and the sibling removed. Until the marker is rewritten, `out_dir` is
  the complete old export; while it says "replacing", the complete new export is the sibling it names (`readable`
  returns it: eval.loading and INIT_FROM read through it); after, `out_dir` is the complete new export. A read that
  began from the sibling and is still going when it is removed fails on a missing object; rerun it. A crash leaves
  the marker saying "replacing": the next export (with `overwrite`) replaces it as usual and removes that sibling.
"""
from __future__ import annotations

import json
import logging
import pathlib
import tempfile
import uuid

import jax
from jax.experimental import multihost_utils

import storage
from models import hf_io
from models.transformer import Transformer

log = logging.getLogger(__name__)
EXPORT_MARKER = "docmix_export.json"


class UnsafeExportTarget(FileExistsError):
    """The export folder exists and is not an earlier export that may be replaced."""


def _marker(folder: storage.Path) -> dict:
    """The folder's parsed marker; UnsafeExportTarget when it is not a JSON object listing its files."""
    path = folder / EXPORT_MARKER
    try:
        marker = json.loads(path.read_text())
        if not all(isinstance(f, str) for f in marker["files"]):
            raise TypeError("'files' must list file names")
    except (ValueError, KeyError, TypeError) as e:
        raise UnsafeExportTarget(f"{path}: unreadable export marker ({e}); not replacing {folder}") from e
    return marker


def check_target(out_dir: str | pathlib.Path, *, overwrite: bool) -> None:
    """Raises UnsafeExportTarget unless exporting to `out_dir` cannot replace anything but an earlier export: a
    missing or empty folder, or (with `overwrite`) one holding the files its marker lists and nothing else — no other
    file, folder (empty or not) or symbolic link, each named in the error."""
    what = storage.kind(out_dir)
    if what == "link":
        raise UnsafeExportTarget(f"{out_dir} is a symbolic link; choose another export path")
    if what == "file":
        raise UnsafeExportTarget(f"{out_dir} exists and is not a folder; choose another export path")
    out_dir = storage.Path(out_dir)
    present = storage.list_entries(out_dir)
    if not present:
        return
    if any(name.startswith("checkpoints/") for name in present) or present.get(EXPORT_MARKER) != "file":
        raise UnsafeExportTarget(
            f"{out_dir} already exists and is not a docmix export (no {EXPORT_MARKER}"
            f"{'; it holds checkpoints' if any(n.startswith('checkpoints/') for n in present) else ''}); nothing was "
            "written. Choose a new or empty folder: an export never replaces anything else")
    listed = {*_marker(out_dir)["files"], EXPORT_MARKER}
    folders = _folders(listed)
    extra = [f"{name} (a symbolic link)" if kind == "link" else f"{name}/" if kind == "folder" else name
             for name, kind in present.items()
             if not (kind == "file" and name in listed or kind == "folder" and name in folders)]
    if extra:
        raise UnsafeExportTarget(f"{out_dir} is an earlier export but also holds what it did not write "
                                 f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); not replacing it. "
                                 "Move them, or export elsewhere")
    if not overwrite:
        raise UnsafeExportTarget(f"{out_dir} holds an earlier export; pass --overwrite to replace it")


def _folders(files) -> set[str]:
    """The folders that the relative file names `files` lie in ('a/b/c.json': 'a/b' and 'a')."""
    return {parent.as_posix() for name in files for parent in pathlib.PurePosixPath(name).parents} - {"."}


def readable(path: str | pathlib.Path) -> storage.Path:
    """The folder to read an export at `path` from: `path` itself, or while a gs:// replacement is under way (its
    marker says "replacing"), the complete new export that the marker names."""
    path = storage.Path(path)
    if not storage.is_remote(path) or not (path / EXPORT_MARKER).is_file():
        return path
    try:
        replacing = json.loads((path / EXPORT_MARKER).read_text()).get("replacing")
    except (ValueError, AttributeError):
        return path
    return storage.Path(replacing) if replacing and (storage.Path(replacing) / EXPORT_MARKER).is_file() else path


def export(model: Transformer, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
           tokenizer_dir: str | pathlib.Path | None = None, overwrite: bool = False,
           source: str | None = None) -> storage.Path:
    """Writes config.json, safetensors, tokenizer files and EXPORT_MARKER to `out_dir` (see the module doc).

    Every process must call it: parameters are gathered collectively, tensor by tensor; process 0 writes, and every
    process returns once the folder is in place.
    """
    check_target(out_dir, overwrite=overwrite)
    out_dir = storage.absolute(out_dir)
    if jax.process_index() != 0:
        hf_io.save_pretrained(model, None, dtype=dtype)  # takes part in every gather, writes nothing
    elif storage.is_remote(out_dir):
        _export_remote(model, out_dir, dtype=dtype, tokenizer_dir=tokenizer_dir, source=source, overwrite=overwrite)
    else:
        _export_local(model, out_dir, dtype=dtype, tokenizer_dir=tokenizer_dir, source=source, overwrite=overwrite)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"docmix export {out_dir}")
    return out_dir


def _write_marker(folder: storage.Path, dtype: str, source: str | None) -> list[str]:
    """Writes the marker listing every file in `folder`; returns that list."""
    files = storage.list_files(folder)
    marker = {"format": "docmix Hugging Face export", "dtype": dtype, "source": source, "files": files}
    (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return files


def _export_local(model: Transformer, out_dir: storage.Path, *, dtype: str, tokenizer_dir, source, overwrite: bool
                  ) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = storage.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    storage.follow_umask(tmp)  # it becomes out_dir: the umask's mode, not tempfile's private 0700
    try:
        hf_io.save_pretrained(model, tmp, dtype=dtype, tokenizer_dir=tokenizer_dir)
        _write_marker(tmp, dtype, source)
        check_target(out_dir, overwrite=overwrite)  # again: the folder may have changed while we wrote
        if not out_dir.exists() or not any(out_dir.iterdir()):
            storage.move_tree(tmp, out_dir)  # a rename onto an empty folder replaces it
            return
        old = storage.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.replaced-", dir=out_dir.parent))
        storage.follow_umask(old)  # holds the earlier export until it is removed (after a crash, for good)
        storage.move_tree(out_dir, old / "export")  # a crash here leaves the earlier export complete, under `old`
        try:
            storage.move_tree(tmp, out_dir)
        except BaseException:
            storage.move_tree(old / "export", out_dir)
            raise
        _remove_export(old / "export")  # only what the earlier export wrote
        if not storage.remove_empty_folder(old):  # something appeared in out_dir while it was replaced: kept
            log.warning("%s: kept, with what %s held that its earlier export did not write", old, out_dir)
    finally:
        if tmp.exists():
            tmp.rmtree()  # our own temporary folder, never the target


def _export_remote(model: Transformer, out_dir: storage.Path, *, dtype: str, tokenizer_dir, source, overwrite: bool
                   ) -> None:
    """Written locally, uploaded whole to a sibling prefix, then swapped in as the module doc describes."""
    staging = out_dir.parent / f".{out_dir.name}.writing-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="docmix-export-") as tmp:
        hf_io.save_pretrained(model, storage.Path(tmp), dtype=dtype, tokenizer_dir=tokenizer_dir)
        new = _write_marker(storage.Path(tmp), dtype, source)
        storage.upload_tree(tmp, staging, last=(EXPORT_MARKER,))
    check_target(out_dir, overwrite=overwrite)  # again: the prefix may have changed while we wrote
    old = _marker(out_dir) if (out_dir / EXPORT_MARKER).is_file() else None
    if old is not None:  # from here on, readers read the complete new export at `staging`
        replacing = {**old, "files": sorted(set(old["files"]) | set(new)), "replacing": str(staging)}
        (out_dir / EXPORT_MARKER).write_text(json.dumps(replacing, indent=1) + "\n")
    for name in sorted(new, key=lambda n: n == "config.json"):  # a folder with config.json is taken as complete
        storage.copy_file(staging / name, out_dir / name)
    for name in sorted(set(old["files"]) - set(new) if old else ()):
        (out_dir / name).unlink(missing_ok=True)
    storage.copy_file(staging / EXPORT_MARKER, out_dir / EXPORT_MARKER)
    _remove_export(staging)
    if old is not None and old.get("replacing"):  # the sibling of an earlier replacement that did not finish
        _remove_export(storage.Path(old["replacing"]))


def _remove_export(folder: storage.Path) -> None:
    """Deletes an export this code wrote: the files its marker lists, then the marker, then (locally) its folders
    that this left empty, itself included. Nothing else: a folder still holding anything stays."""
    if not (folder / EXPORT_MARKER).is_file():
        return
    files = _marker(folder)["files"]
    for name in files:
        (folder / name).unlink(missing_ok=True)
    (folder / EXPORT_MARKER).unlink()
    for sub in [*(folder / f for f in sorted(_folders(files), key=lambda f: -f.count("/"))), folder]:  # deepest 1st
        storage.remove_empty_folder(sub)
