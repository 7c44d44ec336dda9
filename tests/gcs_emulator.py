"""A local GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1 for tests of gs:// paths.

Every client docmix uses is pointed at it and kept off the network: gcsfs (STORAGE_EMULATOR_HOST, anonymous token),
tensorstore's gcs driver used by Orbax (TENSORSTORE_GCS_HTTP_URL, a fixed test token), google-auth (no metadata
server probe), and gcsfs's experimental bucket-type lookup (off: it would call the real control API).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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
        # The emulator serves one request at a time; on a loaded machine tensorstore's concurrent requests queued
        # behind it timed out and were retried, and a retried conditional OCDBT manifest write then failed with
        # "Malformed StorageGeneration". One request at a time and patient timeouts avoid that.
        "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "1", "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "600",
        "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS": "600",
    }


@contextlib.contextmanager
def emulator() -> Iterator[str]:
    """Starts the emulator with an empty bucket `BUCKET`, points this process's clients at it; yields its URL.

    Call it before anything imports gcsfs: gcsfs picks its (experimental, gRPC) client at import from the environment.
    """
    import sys

    import fsspec

    assert "gcsfs" not in sys.modules, "gcsfs was imported before the emulator's environment was set"
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{server._api._httpd.server_port}"  # port 0: the OS picks a free one
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
