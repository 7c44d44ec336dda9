"""One filesystem layer for every path docmix reads or writes: local paths and `gs://` (any fsspec URL).

`storage.Path(p)` is an `etils.epath.Path`: pathlib's API for local paths and for `gs://bucket/...`, which it reaches
through fsspec + gcsfs (the `requirements-gcs.txt` extra). Orbax and Grain resolve their paths through epath too, and
Orbax's array data goes through tensorstore's own `gcs` driver, so checkpoints, data state and everything else land in
the same bucket. Never pass a `gs://` string to `pathlib`: `pathlib.Path("gs://b/r")` is the local `gs:/b/r`.

It lives at the top level (not in data/ or trainer/) because models/ (HF import/export), data/ (corpora, shards),
trainer/ (MODEL_DIR) and eval/ (results) all use it, and models/ must not import data/ or trainer/.

What object stores cannot do, the helpers here do explicitly: `read_range` reads one byte range (a ranged GET, not a
download), `atomic_write` makes a file appear whole (a local temporary file renamed into place; an object is whole
once its upload ends), `list_files` lists a folder recursively (one listing of the prefix; `list_entries` also its
folders and links), `move_tree` copies then deletes (no rename), `local_file` gives libraries that only open local
files (tokenizers) a cached local copy, and `LocalMirror` lets a writer that only writes local files (TensorBoard)
write to a remote folder by syncing. What docmix writes locally gets the modes of the process's umask, also where a
library creates it private (`follow_umask`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO

# epath picks TensorFlow's gfile for gs:// whenever TF is installed (the seqio extra installs it); docmix reaches
# gs:// through fsspec only, so Orbax, Grain and docmix share one client, one auth and one endpoint.
os.environ.setdefault("EPATH_USE_TF", "false")

import fsspec  # noqa: E402
from etils import epath  # noqa: E402  (after the environment default above)

Path = epath.Path
PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URL (gs://, s3://, ...), False for a local path."""
    return "://" in os.fspath(path)


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string, keeping a URL's `scheme://` intact."""
    return os.fspath(Path(base).joinpath(*parts))


def absolute(path: PathLike) -> Path:
    """A local path made absolute (~ expanded, symlinks resolved); a URL unchanged."""
    if is_remote(path):
        return Path(path)
    return Path(pathlib.Path(os.fspath(path)).expanduser().resolve())


def filesystem(url: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(the fsspec filesystem epath uses for `url`, the path within it). The same instance as epath's (and so Orbax's
    and Grain's): its listing cache is then one cache, which `move_tree` invalidates for all of them."""
    from etils.epath import backend

    fs = backend.fsspec_backend.fs(os.fspath(url))
    return fs, fsspec.core.split_protocol(os.fspath(url))[1].rstrip("/")


def read_range(path: PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file, in one read: a seek locally, one ranged GET on an object store (never the whole
    object). Fewer bytes come back only when the file ends before `end`."""
    if not is_remote(path):
        with open(os.fspath(path), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, name = filesystem(path)
    return fs.cat_file(name, start=start, end=end)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Opens `path` for writing so that readers never see it half written: locally a temporary sibling renamed over
    it when the block ends without an error; on an object store the object itself (it appears when its upload
    completes). On an error the target is left as it was."""
    path = Path(path)
    if is_remote(path):
        with path.open(mode, encoding=encoding) as f:
            yield f
        return
    tmp = pathlib.Path(os.fspath(path)).with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
        os.replace(tmp, os.fspath(path))
    finally:
        tmp.unlink(missing_ok=True)


def list_files(root: PathLike) -> list[str]:
    """The relative names ('a/b.txt') of every file under `root`, recursively and sorted; [] when it does not exist.
    One listing of the prefix on an object store."""
    if not is_remote(root):
        folder = pathlib.Path(os.fspath(root))
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    return _objects(root)


def _objects(root: PathLike) -> list[str]:
    """The relative names of the objects under the prefix `root` (one listing), sorted."""
    fs, prefix = filesystem(root)
    fs.invalidate_cache(prefix)
    try:
        names = fs.find(prefix)  # epath refuses a recursive glob on gs://
    except FileNotFoundError:
        return []
    return sorted(name[len(prefix) + 1:] for name in names if name.startswith(prefix + "/"))


def list_entries(root: PathLike) -> dict[str, str]:
    """Everything under the folder `root`, recursively: relative name ('a/b.txt') -> "file", "folder" or "link"
    (sorted by name; {} when it does not exist). Links are not followed: a symbolic link, to a folder or anything
    else, is one entry. Locally every folder is an entry, an empty one too; an object store has folders only as
    prefixes of objects, so there a folder is an entry only where a placeholder object 'a/' stands for it (what
    consoles create for an empty folder)."""
    if is_remote(root):
        return {name.rstrip("/"): "folder" if name.endswith("/") else "file" for name in _objects(root)
                if name.rstrip("/")}
    found = {}
    for folder, dirs, files in os.walk(os.fspath(root)):  # a link to a folder is listed in dirs, never entered
        rel = pathlib.Path(folder).relative_to(os.fspath(root)).as_posix()
        for name in dirs + files:
            kind = "link" if os.path.islink(os.path.join(folder, name)) else "folder" if name in dirs else "file"
            found[name if rel == "." else f"{rel}/{name}"] = kind
    return dict(sorted(found.items()))


def kind(path: PathLike) -> str | None:
    """What is at `path`: "file", "folder", "link" (a local symbolic link, not followed) or None (nothing)."""
    if is_remote(path):
        path = Path(path)
        return "file" if path.is_file() else "folder" if path.is_dir() else None
    local = os.fspath(path)
    if os.path.islink(local):
        return "link"
    return "folder" if os.path.isdir(local) else "file" if os.path.exists(local) else None


def remove_empty_folder(path: PathLike) -> bool:
    """Removes a local folder if it holds nothing and says whether it did (os.rmdir: the kernel refuses a folder that
    holds anything, so nothing that appears in it meanwhile is lost, unlike epath's rmdir, which lists the folder
    and then removes it whole). An object store has no folders: True."""
    if is_remote(path):
        return True
    try:
        os.rmdir(os.fspath(path))
    except OSError:
        return False
    return True


def umask() -> int:
    """This process's file mode creation mask. Linux reports it in /proc/self/status; elsewhere it can only be read
    by setting it, so it is set back at once."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def follow_umask(path: PathLike) -> None:
    """Gives a local file or folder the mode that creating it plainly gives under the process's umask (0644 and
    0755 under umask 022, 0640 and 0750 under 027), for what a library creates private and docmix hands to the user:
    tempfile's folders (0700) and safetensors' files (a 0600 temporary file renamed into place). A URL: nothing
    (objects have no modes)."""
    if is_remote(path):
        return
    full = 0o777 if os.path.isdir(os.fspath(path)) else 0o666
    os.chmod(os.fspath(path), full & ~umask())


def read_json_object(path: PathLike) -> dict:
    """The JSON object in the file at `path`; a file that is not one (cut short, not JSON, a list) is a ValueError
    naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DOCMIX_STORAGE_CACHE") or tempfile.gettempdir()) / "docmix-storage"


def cache_dir(name: str) -> pathlib.Path:
    """A local folder for a cache that must not live on an object store (e.g. JAX's compilation cache of a sweep
    whose out_dir is gs://), under DOCMIX_STORAGE_CACHE or the temporary folder."""
    folder = _cache_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def local_file(path: PathLike) -> pathlib.Path:
    """A local path holding the file's bytes: the file itself when local, else a copy cached per URL and size (for
    libraries that open local files only, e.g. tokenizers.Tokenizer.from_file)."""
    if not is_remote(path):
        return pathlib.Path(os.fspath(path))
    remote = Path(path)
    size = remote.stat().length
    local = _cache_root() / _key(f"{os.fspath(remote)}|{size}") / remote.name
    if not local.is_file() or local.stat().st_size != size:
        _download(remote, local)
    return local


def local_dir(path: PathLike) -> pathlib.Path:
    """A local folder holding the folder's files (recursively): the folder itself when local, else a fresh copy
    (e.g. an HF export on gs:// for a loader that reads local files)."""
    if not is_remote(path):
        return pathlib.Path(os.fspath(path))
    remote = Path(path)
    _cache_root().mkdir(parents=True, exist_ok=True)
    local = pathlib.Path(tempfile.mkdtemp(prefix="docmix-copy-", dir=_cache_root())) / remote.name
    for name in list_files(remote):
        _download(remote / name, local / name)
    return local


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _download(remote: Path, local: pathlib.Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + f".tmp{os.getpid()}")
    with remote.open("rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, local)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copies one file between any two places (local or remote); within one object store, server-side."""
    if is_remote(src) and is_remote(dst):
        fs, source = filesystem(src)
        other, target = filesystem(dst)
        if fs is other:
            fs.copy(source, target)
            return
    with Path(src).open("rb") as fin, Path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


def move_tree(src: PathLike, dst: PathLike) -> None:
    """Moves a folder to `dst` (which must not exist). Local: one atomic rename. An object store has no rename: every
    object is copied, then the originals are deleted, so an interrupted move leaves each object in one place or both,
    never in neither."""
    if not is_remote(src):
        os.replace(os.fspath(src), os.fspath(dst))
        return
    fs, root = filesystem(src)
    _, target = filesystem(dst)
    names = fs.find(root)
    for name in names:
        fs.copy(name, f"{target}/{name[len(root) + 1:]}")  # filesystem() strips trailing slashes
    fs.rm(names)
    fs.invalidate_cache()


def upload_tree(local_dir: PathLike, dst: PathLike, *, last: Iterable[str] = ()) -> None:
    """Copies the files under `local_dir` to `dst` (local or remote), the relative names in `last` after all others
    (a reader that looks for them, e.g. an HF folder's config.json, then sees a complete folder)."""
    local_dir = pathlib.Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    late = set(last)
    for f in sorted(files, key=lambda p: p.relative_to(local_dir).as_posix() in late):
        target = Path(dst) / f.relative_to(local_dir).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(f, target)


class LocalMirror:
    """A local folder for writers that only write local files; `sync()` copies files that changed to `remote`.

    For a local `remote` the folder is `remote` itself and `sync()` does nothing.
    """

    def __init__(self, remote: PathLike):
        self.remote = Path(remote)
        if is_remote(remote):
            self._tmp = tempfile.TemporaryDirectory(prefix="docmix-mirror-")
            self.local = pathlib.Path(self._tmp.name)
        else:
            self._tmp = None
            self.local = pathlib.Path(os.fspath(remote))
        self._synced: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        if self._tmp is None:
            return
        for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = f.relative_to(self.local).as_posix()
            stamp = (f.stat().st_size, f.stat().st_mtime_ns)
            if self._synced.get(rel) != stamp:
                target = self.remote / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                copy_file(f, target)
                self._synced[rel] = stamp

    def close(self) -> None:
        self.sync()
        if self._tmp is not None:
            self._tmp.cleanup()
