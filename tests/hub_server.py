"""A stand-in for the Hugging Face Hub on 127.0.0.1 (real HTTP, stdlib http.server in a thread): one dataset
repository at one revision, served from a local folder the way the Hub's API and file URLs are:
`/api/datasets/REPO/revision/REV` (the file list and the card's `configs`) and `/datasets/REPO/resolve/REV/PATH`."""
from __future__ import annotations

import contextlib
import http.server
import json
import pathlib
import threading
from collections.abc import Iterator


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server naming)
        hub = self.server.hub
        hub["requests"].append(self.path)
        prefix = f"/datasets/{hub['repo']}/resolve/{hub['revision']}/"
        if self.path == f"/api/datasets/{hub['repo']}/revision/{hub['revision']}":
            return self.reply(200, json.dumps(hub["info"]).encode())
        if self.path.startswith(prefix) and self.path[len(prefix):] in hub["files"]:
            return self.reply(200, (hub["folder"] / self.path[len(prefix):]).read_bytes())
        self.reply(404, b'{"error": "not found"}')

    def reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_dataset(folder: pathlib.Path, repo: str, revision: str, configs: dict[str, str]) -> Iterator[dict]:
    """Serves the files of `folder` as `repo`@`revision` whose card maps config name -> file (train split). Yields a
    dict with `endpoint` (the base URL, for HF_ENDPOINT) and `requests` (every path asked for, in order)."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    info = {"id": repo, "sha": revision, "siblings": [{"rfilename": f} for f in files],
            "cardData": {"license": "cc-by-nc-4.0", "configs": [
                {"config_name": name, "data_files": [{"split": "train", "path": path}]}
                for name, path in configs.items()]}}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.hub = {"repo": repo, "revision": revision, "folder": folder, "files": set(files), "info": info,
                  "requests": [], "endpoint": f"http://127.0.0.1:{server.server_address[1]}"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.hub
    finally:
        server.shutdown()
        server.server_close()
