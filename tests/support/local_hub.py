"""A local stand-in for the model hub: an HTTP server on 127.0.0.1 laid out like ``{endpoint}/{repo}/resolve/main/...``,
so download code runs for real (``HF_ENDPOINT`` pointed at it) without the network."""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path

from encoders.downloads import ARC2FACE_REPO

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


class Server:
    """A tiny HTTP server on 127.0.0.1 serving ``root``, counting requests; ``broken`` paths send
    fewer bytes than their Content-Length promises."""

    def __init__(self, root: Path):
        self.requests: list[str] = []  # GET requests (file transfers)
        self.heads: list[str] = []  # HEAD requests (huggingface_hub's metadata look-ups)
        self.authorizations: list[str | None] = []  # the Authorization header of each HEAD request
        self.broken: set[str] = set()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def end_headers(self):
                # What a Hub answers besides the file, and huggingface_hub requires: the commit and an ETag.
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{abs(hash(self.path)):x}"')
                super().end_headers()

            def do_HEAD(self):
                server.heads.append(self.path)
                server.authorizations.append(self.headers.get("Authorization"))
                if self.path in server.broken:
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    return
                super().do_HEAD()

            def do_GET(self):
                server.requests.append(self.path)
                if self.path in server.broken:
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / ARC2FACE_REPO / "resolve" / "main" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root
