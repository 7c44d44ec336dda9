"""One writer per MODEL_DIR: a lock object created atomically if absent, naming its owner, renewed while it runs,
removed at exit.

The lock is the file MODEL_DIR/LOCK_NAME holding JSON {host, pid, started, heartbeat, token, command}. It is taken with
a create-if-absent operation, which local filesystems, NFS and object stores (GCS: `ifGenerationMatch=0`) all provide
atomically — unlike fcntl locks, which remote storage ignores. Only `LockStore`'s four operations are used, so the lock
works on any storage layer that implements them: `LocalStore` for local paths, `ObjectStore` for gs:// (fsspec).

While the run lives, a thread rewrites the lock with a new `heartbeat` every RENEW_S seconds. A lock left by a process
that died without releasing it (SIGKILL, OOM kill, lost or preempted VM) is stale: when it names this host and a
process id that no longer runs, or when its heartbeat is older than LEASE_S (a run on another, possibly vanished,
machine), it is broken with a warning. A lock held on another host whose heartbeat is younger than that is watched
for up to one lease: renewed -> the run is refused, naming the holder; not renewed -> broken (so a relaunch after a
lost VM waits instead of failing).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Protocol

import exit_codes

log = logging.getLogger(__name__)
LOCK_NAME = "writer.lock"
RENEW_S = 60.0   # how often a holder rewrites its heartbeat
LEASE_S = 600.0  # a lock whose heartbeat is older than this is stale (10 missed renewals: not a slow write)


class RunLocked(RuntimeError):
    """Another train.py process holds MODEL_DIR."""
    exit_code = exit_codes.USAGE


class LockStore(Protocol):
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Writes `data` to a new object at `path`; False (writing nothing) when `path` already exists."""

    def read(self, path: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def delete(self, path: str) -> None:
        """Removes the object (no error when it is already gone)."""

    def overwrite(self, path: str, data: bytes) -> None:
        """Replaces the object's bytes; a reader sees the old bytes or the new ones, never a mix."""


class LocalStore:
    """LockStore on a local or NFS path. Create-if-absent is a hard link of a finished temporary file: atomic on both,
    and a reader never sees the lock created but still empty. Mounts without hard links (gcsfuse, some FUSE and SMB
    mounts) get O_CREAT | O_EXCL and then a write, where a reader can see the lock empty for a moment."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
        tmp = self._write_tmp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            return self._create_then_write(path, data)
        finally:
            os.remove(tmp)
        return True

    @staticmethod
    def _create_then_write(path: str, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def overwrite(self, path: str, data: bytes) -> None:
        os.replace(self._write_tmp(path, data), path)

    @staticmethod
    def _write_tmp(path: str, data: bytes) -> str:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp


class ObjectStore:
    """LockStore on an object store (gs://) through fsspec. Create-if-absent is gcsfs's `mode="create"`, i.e. GCS's
    `ifGenerationMatch=0` precondition: of two concurrent creates exactly one succeeds. A single-object write is
    atomic, so `overwrite` is a plain write."""

    def __init__(self, url: str):
        import storage

        self.fs, _ = storage.filesystem(url)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def delete(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def overwrite(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _parse(raw: bytes) -> dict:
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unreadable lock record (not JSON with host, pid and heartbeat)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    heartbeat = holder.get("heartbeat", holder.get("started", 0))
    return (f"host {holder.get('host')!r} pid {holder.get('pid')} since {started}, last heartbeat "
            f"{time.time() - heartbeat:.0f}s ago ({holder.get('command', '?')})")


class RunLock:
    """`with RunLock(model_dir):` holds MODEL_DIR's writer lock for the block (renewing it every `renew_s` seconds);
    raises RunLocked if another holds it. The store defaults to ObjectStore for a URL, LocalStore otherwise."""

    def __init__(self, model_dir: str, store: LockStore | None = None, *, renew_s: float = RENEW_S,
                 lease_s: float = LEASE_S):
        self.path = f"{str(model_dir).rstrip('/')}/{LOCK_NAME}"
        self.store = store or (ObjectStore(self.path) if "://" in self.path else LocalStore())
        self.renew_s, self.lease_s = renew_s, lease_s
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                       "token": uuid.uuid4().hex, "command": " ".join(sys.argv)[:500]}
        self._data = json.dumps(self.record).encode()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        holder: dict = {}
        for _ in range(3):  # another try only after breaking a stale lock or seeing it released
            if self.store.create_exclusive(self.path, self._data):
                self._renewer = threading.Thread(target=self._renew, name="docmix-run-lock", daemon=True)
                self._renewer.start()
                return
            raw = self.store.read(self.path)
            if raw is None:
                continue  # released between our two calls
            holder = _parse(raw)
            if not self._stale(holder):
                verdict, seen = self._watch(raw, holder)
                if verdict == "alive":
                    holder = seen or holder
                    break
                if verdict == "changed":
                    continue
            log.warning("breaking the stale lock %s: %s is no longer running (its process is gone, or it has not "
                        "renewed the lock for %.0fs)", self.path, _describe(holder), self.lease_s)
            if self.store.read(self.path) == raw:  # unchanged: nobody else broke and retook it meanwhile
                self.store.delete(self.path)
        raise RunLocked(f"{self.path}: another run is writing to this MODEL_DIR: {_describe(holder)}. Wait for it "
                        f"to finish, or use another MODEL_DIR. If that run is no longer running (e.g. its machine is "
                        f"gone), the next run breaks the lock once its heartbeat is {self.lease_s:.0f}s old; or "
                        f"delete {self.path} and rerun.")

    def _watch(self, raw: bytes, holder: dict) -> tuple[str, dict]:
        """A lock held on another host cannot be judged by its pid: watch it until its holder renews it ("alive"),
        it changes otherwise ("changed": released or retaken) or its heartbeat is LEASE_S old ("gone": e.g. a
        preempted VM; a relaunch then waits for the lease instead of failing). Same-host holders are "alive".
        Returns the verdict and the holder's record as last read."""
        heartbeat = holder.get("heartbeat")
        if holder.get("host") == self.record["host"] or not isinstance(heartbeat, (int, float)):
            return "alive", holder
        log.warning("%s is held by %s; waiting up to %.0fs for it to renew the lock", self.path, _describe(holder),
                    max(0.0, heartbeat + self.lease_s - time.time()))
        while time.time() - heartbeat <= self.lease_s:
            time.sleep(max(0.01, min(self.renew_s / 4, heartbeat + self.lease_s - time.time())))
            now = self.store.read(self.path)
            if now != raw:
                renewed = now is not None and _parse(now).get("token") == holder.get("token")
                return ("alive", _parse(now)) if renewed else ("changed", {})
        return "gone", holder

    def _stale(self, holder: dict) -> bool:
        if (holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int)
                and holder["pid"] != os.getpid() and not _pid_running(holder["pid"])):
            return True
        heartbeat = holder.get("heartbeat", holder.get("started"))
        return isinstance(heartbeat, (int, float)) and time.time() - heartbeat > self.lease_s

    def _ours(self) -> bool:
        raw = self.store.read(self.path)
        return raw is not None and _parse(raw).get("token") == self.record["token"]

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                if not self._ours():
                    log.error("%s: this run no longer holds the writer lock (another run broke it as stale); "
                              "stop one of the two runs", self.path)
                    return
                self.record["heartbeat"] = time.time()
                self._data = json.dumps(self.record).encode()
                self.store.overwrite(self.path, self._data)
            except OSError as e:  # a storage hiccup: the lease outlasts several missed renewals
                log.warning("%s: could not renew the writer lock (%s)", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._ours():  # never remove a lock we do not hold
            self.store.delete(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
