"""One writer per MODEL_DIR: a lock object created atomically if absent, naming its owner, renewed while it runs by
compare-and-swap, removed at exit; a run that loses it stops.

The lock is the file MODEL_DIR/LOCK_NAME holding JSON {host, pid, started, heartbeat, token, command}. It is taken with
a create-if-absent operation, which local filesystems, NFS and object stores (GCS: `ifGenerationMatch=0`) all provide
atomically — unlike fcntl locks, which remote storage ignores. Every later change (renewal, breaking a stale lock,
release) is a compare-and-swap against the version last read: it happens only if nobody changed the lock since, so two
runs can never both believe they renewed or broke it. Only `LockStore`'s four operations are used, so the lock works
on any storage layer that implements them: `LocalStore` for local paths (the swap by atomic renames), `ObjectStore`
for gs:// (GCS generation preconditions).

While the run lives, a thread rewrites the lock with a new `heartbeat` every RENEW_S seconds. A lock left by a process
that died without releasing it (SIGKILL, OOM kill, lost or preempted VM) is stale: when it names this host and a
process id that no longer runs, or when its heartbeat is older than LEASE_S (a run on another, possibly vanished,
machine), it is broken with a warning. A lock held on another host whose heartbeat is younger than that is watched
for up to one lease: renewed -> the run is refused, naming the holder; not renewed -> broken (so a relaunch after a
lost VM waits instead of failing). A holder that finds its lock taken (another run broke it as stale, e.g. after this
run stalled for a whole lease) sets `lost`, naming the new holder; the training loop stops at the next step boundary
and writes nothing more to MODEL_DIR (trainer.loop, exit status 2).
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


class LockLost(RunLocked):
    """This run held MODEL_DIR's writer lock and another run took it over; this run writes nothing more there."""


class LockStore(Protocol):
    """Four atomic operations on one small object. A version is what `read` returned with the bytes; `replace` and
    `delete` act only if the object is still at that version (compare-and-swap)."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Writes `data` to a new object at `path`; False (writing nothing) when `path` already exists."""

    def read(self, path: str) -> tuple[bytes, object] | None:
        """(the object's bytes, its version), or None when it does not exist."""

    def replace(self, path: str, data: bytes, version: object) -> bool:
        """Replaces the object's bytes if it is still at `version`; False (changing nothing) otherwise. A reader
        sees the old bytes or the new ones, never a mix."""

    def delete(self, path: str, version: object) -> bool:
        """Removes the object if it is still at `version`; False (removing nothing) otherwise."""


class LocalStore:
    """LockStore on a local or NFS path. Create-if-absent is a hard link of a finished temporary file: atomic on both,
    and a reader never sees the lock created but still empty (mounts without hard links, such as gcsfuse, get
    O_CREAT | O_EXCL and then a write). A version is the bytes themselves (every record carries a fresh heartbeat).
    Compare-and-swap renames the lock to a name of its own (atomic: of two processes, one gets it), compares what it
    took, then puts the new lock (or, on a mismatch, what it took) back with create-if-absent. For that moment the
    lock is absent: a run starting just then takes it, and the holder, finding it taken, stops."""

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

    def read(self, path: str) -> tuple[bytes, bytes] | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, path: str, data: bytes, version: bytes) -> bool:
        return self._swap(path, version, data)

    def delete(self, path: str, version: bytes) -> bool:
        return self._swap(path, version, None)

    def _swap(self, path: str, version: bytes, data: bytes | None) -> bool:
        """Takes the lock away by a rename; if it was at `version`, puts `data` in its place (None: nothing), else
        puts back what it took."""
        taken = f"{path}.{os.getpid()}.{threading.get_ident()}.swap"
        try:
            os.rename(path, taken)
        except FileNotFoundError:
            return False
        try:
            with open(taken, "rb") as f:
                found = f.read()
            if found != version:
                self.create_exclusive(path, found)  # put back (unless a new lock was created meanwhile)
                return False
            return data is None or self.create_exclusive(path, data)
        finally:
            os.remove(taken)

    @staticmethod
    def _write_tmp(path: str, data: bytes) -> str:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp


class ObjectStore:
    """LockStore on GCS (gs://) through gcsfs. A version is the object's generation, which GCS returns with its bytes
    (`x-goog-generation`, one GET); create-if-absent is `ifGenerationMatch=0` (gcsfs's `mode="create"`), replace and
    delete send `ifGenerationMatch=<generation read>`, and GCS answers 412 (writing nothing) when another write came
    between: of two concurrent writers exactly one succeeds. gcsfs has no public conditional replace or delete: these
    two are JSON API requests through its client (auth, retries), checked against the emulator by
    tests/test_storage_gcs.py."""

    def __init__(self, url: str):
        import storage

        self.fs, _ = storage.filesystem(url)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            headers, data = self.fs.call("GET", self.fs.url(path))
        except FileNotFoundError:
            return None
        return data, headers["x-goog-generation"]

    def replace(self, path: str, data: bytes, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="media", name=key,
                         ifGenerationMatch=version, data=data, json_out=True)
        except (FileExistsError, FileNotFoundError):  # 412: the generation changed (or the object is gone)
            return False
        finally:
            self.fs.invalidate_cache(path)
        return True

    def delete(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):
            return False
        finally:
            self.fs.invalidate_cache(path)
        return True


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
    """`with RunLock(model_dir) as lock:` holds MODEL_DIR's writer lock for the block (renewing it every `renew_s`
    seconds); raises RunLocked if another holds it. `lock.lost` is None while it holds the lock, else a sentence
    naming the run that took it. The store defaults to ObjectStore for a URL, LocalStore otherwise."""

    def __init__(self, model_dir: str, store: LockStore | None = None, *, renew_s: float | None = None,
                 lease_s: float = LEASE_S):
        import storage

        self.path = f"{str(model_dir).rstrip('/')}/{LOCK_NAME}"
        self.store = store or (ObjectStore(self.path) if storage.is_remote(self.path) else LocalStore())
        self.renew_s, self.lease_s = renew_s or RENEW_S, lease_s
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                       "token": uuid.uuid4().hex, "command": " ".join(sys.argv)[:500]}
        self._data = json.dumps(self.record).encode()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None

    def acquire(self) -> None:
        holder: dict = {}
        for _ in range(3):  # another try only after breaking a stale lock or seeing it released
            if self.store.create_exclusive(self.path, self._data):
                self._renewer = threading.Thread(target=self._renew, name="docmix-run-lock", daemon=True)
                self._renewer.start()
                return
            found = self.store.read(self.path)
            if found is None:
                continue  # released between our two calls
            raw, version = found
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
            self.store.delete(self.path, version)  # only as read: not if its holder renewed it, or another broke it
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
            found = self.store.read(self.path)
            if found is None or found[0] != raw:
                renewed = found is not None and _parse(found[0]).get("token") == holder.get("token")
                return ("alive", _parse(found[0])) if renewed else ("changed", {})
        return "gone", holder

    def _stale(self, holder: dict) -> bool:
        if (holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int)
                and holder["pid"] != os.getpid() and not _pid_running(holder["pid"])):
            return True
        heartbeat = holder.get("heartbeat", holder.get("started"))
        return isinstance(heartbeat, (int, float)) and time.time() - heartbeat > self.lease_s

    def _renew(self) -> None:
        """Every renew_s: a new heartbeat, written only over our own lock as last read (compare-and-swap). A lock
        found taken by another run sets `lost` and ends the thread; a storage error is retried at the next renewal
        (the lease outlasts several)."""
        while not self._stop.wait(self.renew_s):
            try:
                found = self.store.read(self.path)
                if found is not None and _parse(found[0]).get("token") == self.record["token"]:
                    record = {**self.record, "heartbeat": time.time()}
                    data = json.dumps(record).encode()
                    if self.store.replace(self.path, data, found[1]):
                        self.record, self._data = record, data
                        continue
                    found = self.store.read(self.path)  # changed under us, or our write landed on a retry
                    if found is not None and found[0] == data:
                        self.record, self._data = record, data
                        continue
            except OSError as e:
                log.warning("%s: could not renew the writer lock (%s)", self.path, e)
                continue
            holder = _describe(_parse(found[0])) if found is not None else "nobody (the lock was deleted)"
            self.lost = (f"{self.path}: this run no longer holds MODEL_DIR's writer lock; it is now held by {holder}. "
                         "This run stops and writes nothing more to MODEL_DIR")
            log.error("%s", self.lost)
            return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        found = self.store.read(self.path)
        if found is not None and _parse(found[0]).get("token") == self.record["token"]:  # never remove another's
            self.store.delete(self.path, found[1])

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
