"""One writer per MODEL_DIR: a lock object created atomically if absent, naming its owner, removed at exit.

The lock is the file MODEL_DIR/LOCK_NAME holding JSON {host, pid, started, command}. It is taken with a
create-if-absent operation, which local filesystems, NFS and object stores (GCS: `ifGenerationMatch=0`) all provide
atomically — unlike fcntl locks, which remote storage ignores. Only `LockStore`'s four operations are used, so the lock
works on any storage layer that implements them; `LocalStore` is the local one.

A lock left by a process that died without releasing it (SIGKILL, OOM kill, lost VM) is stale. When it names this
host and a process id that no longer runs, it is broken automatically, with a warning. Otherwise the run is refused
with a message naming the holder; if that run is gone, delete the lock file and rerun.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Protocol

log = logging.getLogger(__name__)
LOCK_NAME = "writer.lock"


class RunLocked(RuntimeError):
    """Another train.py process holds MODEL_DIR."""


class LockStore(Protocol):
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Writes `data` to a new object at `path`; False (writing nothing) when `path` already exists."""

    def read(self, path: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def delete(self, path: str) -> None:
        """Removes the object (no error when it is already gone)."""


class LocalStore:
    """LockStore on a local or NFS path (O_CREAT | O_EXCL is atomic on both)."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
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


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"host {holder.get('host')!r} pid {holder.get('pid')} since {started} ({holder.get('command', '?')})"


class RunLock:
    """`with RunLock(model_dir):` holds MODEL_DIR's writer lock for the block; raises RunLocked if another holds it."""

    def __init__(self, model_dir: str, store: LockStore | None = None):
        self.path = f"{str(model_dir).rstrip('/')}/{LOCK_NAME}"
        self.store = store or LocalStore()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "command": " ".join(sys.argv)[:500]}
        self._data = json.dumps(self.record).encode()

    def acquire(self) -> None:
        for _ in range(2):  # a second try only after breaking a stale lock
            if self.store.create_exclusive(self.path, self._data):
                return
            raw = self.store.read(self.path)
            if raw is None:
                continue  # released between our two calls
            try:
                holder = json.loads(raw)
            except ValueError:
                holder = {}
            if not self._stale(holder):
                break
            log.warning("breaking the stale lock %s: %s is no longer running", self.path, _describe(holder))
            if self.store.read(self.path) == raw:  # unchanged: nobody else broke and retook it meanwhile
                self.store.delete(self.path)
        raw = self.store.read(self.path) or b"{}"
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = {}
        raise RunLocked(f"{self.path}: another run is writing to this MODEL_DIR: {_describe(holder)}. Wait for it "
                        f"to finish, or use another MODEL_DIR. If that run is no longer running (e.g. its machine is "
                        f"gone), delete {self.path} and rerun.")

    def _stale(self, holder: dict) -> bool:
        return (holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int)
                and holder["pid"] != os.getpid() and not _pid_running(holder["pid"]))

    def release(self) -> None:
        if self.store.read(self.path) == self._data:  # never remove a lock we do not hold
            self.store.delete(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
