"""A local GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1: the bucket of a rehearsal
(`launch.tpu --rehearse`) and of the tests of gs:// paths.

Every client docmix uses is pointed at it and kept off the network: gcsfs (STORAGE_EMULATOR_HOST, anonymous token),
tensorstore's gcs driver used by Orbax (TENSORSTORE_GCS_HTTP_URL, a fixed test token), google-auth (no metadata
server probe), and gcsfs's experimental bucket-type lookup (off: it would call the real control API). Where the
emulator differs from GCS in what these clients rely on, `behave_as_gcs` makes it behave as GCS does. Tests see the
requests it served (`recording`: which objects, bytes sent and served) and can make some of them fail (`failing`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import urllib.request
from collections.abc import Iterable, Iterator
from http import HTTPStatus

BUCKET = "bucket"


@dataclasses.dataclass(frozen=True)
class Served:
    """One request the emulator answered: its handler (insert, download, get, compose, delete, ...), the object's
    name in the bucket, the bytes the client sent and those the answer carried, and the seconds its handler took
    (the emulator's own work, e.g. concatenating a composed object in Python, which GCS does server-side)."""
    handler: str
    name: str | None
    sent: int
    served: int
    seconds: float


@dataclasses.dataclass
class Fault:
    """The next `times` requests of `handlers` for objects whose name starts with `prefix` are answered `status`."""
    prefix: str
    times: int
    handlers: tuple[str, ...]
    status: HTTPStatus


_RUNNING: str | None = None  # the URL of this process's emulator while one runs
_LOG: list[Served] | None = None
_FAULTS: list[Fault] = []


@contextlib.contextmanager
def recording() -> Iterator[list[Served]]:
    """Yields the list of requests the emulator answers while the block runs."""
    global _LOG
    _LOG = log = []
    try:
        yield log
    finally:
        _LOG = None


@contextlib.contextmanager
def failing(prefix: str, times: int, handlers: tuple[str, ...] = ("download", "get", "insert", "compose", "delete"),
            status: HTTPStatus = HTTPStatus.FORBIDDEN) -> Iterator[Fault]:
    """Makes the next `times` requests for objects under `prefix` fail with `status` while the block runs. The
    default, 403, is an error that gcsfs and tensorstore do not retry themselves: what an error that outlasted their
    retries looks like to docmix."""
    fault = Fault(prefix, times, handlers, status)
    _FAULTS.append(fault)
    try:
        yield fault
    finally:
        _FAULTS.remove(fault)


def _object_name(request) -> str | None:
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    if name is None and isinstance(request.data, dict):
        name = (request.data.get("meta") or request.data).get("name")
    return name


def _instrumented(handler):
    def handle(request, response, storage, *args, **kwargs):
        name = _object_name(request)
        for fault in _FAULTS:
            if fault.times > 0 and handler.__name__ in fault.handlers and (name or "").startswith(fault.prefix):
                fault.times -= 1
                response.status = fault.status
                return None
        start = time.perf_counter()
        result = handler(request, response, storage, *args, **kwargs)
        seconds = time.perf_counter() - start
        if _LOG is not None:
            data = request.data["content"] if isinstance(request.data, dict) and "content" in request.data \
                else request.data
            body = response._content  # noqa: SLF001 - the emulator's response has no public body accessor
            _LOG.append(Served(handler.__name__, name, len(data) if isinstance(data, (bytes, str)) else 0,
                               len(body) if isinstance(body, (bytes, str)) else 0, seconds))
        return result

    handle.__name__ = handler.__name__
    return handle


def client_env(url: str) -> dict[str, str]:
    """Environment variables that send every GCS client to the emulator at `url` and nowhere else."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9", "GOOGLE_CLOUD_PROJECT": "docmix-test",
        "EPATH_USE_TF": "false",
        # The emulator serves one request at a time: on a loaded machine tensorstore's concurrent requests queue
        # behind it. One request at a time and patient timeouts keep them from timing out and being retried.
        "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "1", "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "600",
        "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS": "600",
    }


def behave_as_gcs() -> None:
    """What GCS does that the emulator does not, and that docmix's clients rely on (and every handler is
    instrumented for `recording` and `failing`):
    - an upload or delete with `ifGenerationMatch=G` acts only while the object is at generation G (G=0: absent;
      create-if-absent for the writer lock and tensorstore's OCDBT manifests; G>0: the writer lock's compare-and-swap)
      and answers 412 Precondition Failed otherwise, changing nothing;
    - a media download carries the object's generation in `x-goog-generation` (tensorstore reads it to make its next
      conditional write; without it, that write fails with "Malformed StorageGeneration")."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.insert, "behaves_as_gcs", False):
        return

    def exists(storage, bucket: str, name: str | None) -> dict | None:
        try:
            return storage.get_file_obj(bucket, name)
        except NotFound:
            return None

    def precondition_fails(request, storage, name: str | None) -> bool:
        wanted = (request.query.get("ifGenerationMatch") or [None])[0]
        if wanted is None:
            return False
        current = exists(storage, request.params["bucket_name"], name)
        return current is not None if wanted == "0" else current is None or str(current["generation"]) != wanted

    def insert(request, response, storage, *args, **kwargs):
        name = (request.query.get("name") or [None])[0]
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("meta") or request.data).get("name")
        if precondition_fails(request, storage, name):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return original["insert"](request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        if precondition_fails(request, storage, request.params["object_id"]):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return original["delete"](request, response, storage, *args, **kwargs)

    def download(request, response, storage, *args, **kwargs):
        result = original["download"](request, response, storage, *args, **kwargs)
        obj = exists(storage, request.params["bucket_name"], request.params["object_id"])
        if obj is not None:
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
        return result

    original = {"insert": objects.insert, "delete": objects.delete, "download": objects.download}
    replacement = {original["insert"]: insert, original["delete"]: delete, original["download"]: download}
    for name, handler in (("insert", insert), ("delete", delete), ("download", download)):
        handler.__name__ = name
    insert.behaves_as_gcs = True
    objects.insert, objects.delete, objects.download = insert, delete, download  # server.py looks them up here too
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = _instrumented(replacement.get(handler, handler))


def create_buckets(url: str, names: Iterable[str]) -> None:
    """Creates empty buckets on the emulator at `url` (its JSON API; GCS itself would need a project and rights)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never through a proxy
    for name in names:
        request = urllib.request.Request(f"{url}/storage/v1/b?project=docmix", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        opener.open(request, timeout=60).close()


@contextlib.contextmanager
def emulator(buckets: Iterable[str] = (BUCKET,)) -> Iterator[str]:
    """Starts the emulator with empty `buckets`, points this process's clients at it; yields its URL. Inside a
    running one (tests/conftest.py's session fixture), yields that one's URL: one emulator per process.

    Call it before anything imports gcsfs: gcsfs picks its (experimental, gRPC) client at import from the environment.
    """
    import sys

    import fsspec

    global _RUNNING
    if _RUNNING is not None:
        yield _RUNNING
        return
    if "gcsfs" in sys.modules:
        raise RuntimeError("gcsfs was imported before the GCS emulator's environment was set")
    from gcp_storage_emulator.server import create_server

    behave_as_gcs()
    # Quiet: its "Resource not found" for every lookup of an absent object (as clients probe before writing), and
    # a traceback for every connection a client closes early.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    server._api._httpd.handle_error = lambda request, client_address: None
    url = f"http://127.0.0.1:{server._api._httpd.server_port}"  # port 0: the OS picks a free one
    create_buckets(url, buckets)
    saved = dict(os.environ)
    os.environ.update(client_env(url))
    fsspec.config.conf.setdefault("gs", {})["token"] = "anon"  # fsspec read FSSPEC_* at import, before this
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    _RUNNING = url
    try:
        yield url
    finally:
        _RUNNING = None
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()  # (no new instance: it would look for real credentials)
        os.environ.clear()
        os.environ.update(saved)
        fsspec.config.conf.get("gs", {}).pop("token", None)
        fsspec.config.conf.get("gcs", {}).pop("token", None)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.emulator [--bucket=NAME ...]`: serves until stopped; prints its URL first (the clients'
    STORAGE_EMULATOR_HOST; `client_env(url)` is everything they need)."""
    import argparse
    import signal
    import threading

    parser = argparse.ArgumentParser(prog="python -m launch.emulator", description=main.__doc__)
    parser.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    with emulator(args.bucket or [BUCKET]) as url:
        print(url, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    import sys

    import exit_codes

    sys.exit(exit_codes.run(main, "python -m launch.emulator"))
