"""A local GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1: the bucket of a rehearsal
(`launch.tpu --rehearse`) and of the tests of gs:// paths.

Every client docmix uses is pointed at it and kept off the network: gcsfs (STORAGE_EMULATOR_HOST, anonymous token),
tensorstore's gcs driver used by Orbax (TENSORSTORE_GCS_HTTP_URL, a fixed test token), google-auth (no metadata
server probe), and gcsfs's experimental bucket-type lookup (off: it would call the real control API). Where the
emulator differs from GCS in what these clients rely on, `behave_as_gcs` makes it behave as GCS does.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.request
from collections.abc import Iterable, Iterator

BUCKET = "bucket"


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
    """Two things GCS does that the emulator does not, and that docmix's clients rely on:
    - an upload with `ifGenerationMatch=0` (create only if absent: the writer lock, tensorstore's OCDBT manifests)
      answers 412 Precondition Failed, writing nothing, when the object exists;
    - a media download carries the object's generation in `x-goog-generation` (tensorstore reads it to make its next
      conditional write; without it, that write fails with "Malformed StorageGeneration")."""
    from http import HTTPStatus

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

    def insert(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch") == ["0"]:
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or request.data).get("name")
            if exists(storage, request.params["bucket_name"], name) is not None:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return original["insert"](request, response, storage, *args, **kwargs)

    def download(request, response, storage, *args, **kwargs):
        result = original["download"](request, response, storage, *args, **kwargs)
        obj = exists(storage, request.params["bucket_name"], request.params["object_id"])
        if obj is not None:
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
        return result

    original = {"insert": objects.insert, "download": objects.download}
    replacement = {original["insert"]: insert, original["download"]: download}
    insert.behaves_as_gcs = True
    objects.insert, objects.download = insert, download  # server.py also looks them up here
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in replacement:
                handlers[method] = replacement[handler]


def create_buckets(url: str, names: Iterable[str]) -> None:
    """Creates empty buckets on the emulator at `url` (its JSON API; GCS itself would need a project and rights)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never through a proxy
    for name in names:
        request = urllib.request.Request(f"{url}/storage/v1/b?project=docmix", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        opener.open(request, timeout=60).close()


@contextlib.contextmanager
def emulator(buckets: Iterable[str] = (BUCKET,)) -> Iterator[str]:
    """Starts the emulator with empty `buckets`, points this process's clients at it; yields its URL.

    Call it before anything imports gcsfs: gcsfs picks its (experimental, gRPC) client at import from the environment.
    """
    import sys

    import fsspec

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
    try:
        yield url
    finally:
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

    sys.exit(main())
