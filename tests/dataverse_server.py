"""A tiny local stand-in for the Dataverse endpoints `simmstnet data fetch` uses, with faults.

Serves on 127.0.0.1 (ephemeral port, in a thread):
  GET /api/datasets/:persistentId/?persistentId=DOI  -> dataset JSON (data.latestVersion.files)
  GET /api/access/datafile/ID[?format=original]      -> file bytes, honouring "Range: bytes=N-"
  GET /store/ID                                      -> bytes, when `redirect` is on (like S3)
Faults are queued per file id and used up one per download request:
  "corrupt" (wrong bytes, same length), "drop" (half the body, then the connection closes),
  "503" (Service Unavailable); and persistent switches `always_corrupt` and `ignore_range`.
Every request is logged as (path, query, Range header) in `requests`.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FakeFile:
    file_id: int
    name: str
    content: bytes
    checksum_type: str = "MD5"      # "MD5", "SHA-1", "SHA-256" or None
    tabular: bool = False            # ingested: listing shows a .tab; originals need format=original

    @property
    def tab_bytes(self) -> bytes:
        # Dataverse's generated archival copy differs from the original upload.
        return b"var1\tvar2\n" + self.content.replace(b",", b"\t")

    def digest(self) -> str:
        algo = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256"}[self.checksum_type]
        return hashlib.new(algo, self.content).hexdigest()

    def entry(self) -> dict:
        data = {"id": self.file_id, "filename": self.name, "filesize": len(self.content),
                "contentType": "text/plain"}
        if self.checksum_type:
            data["checksum"] = {"type": self.checksum_type, "value": self.digest()}
            if self.checksum_type == "MD5":
                data["md5"] = self.digest()
        label = self.name
        if self.tabular:
            label = self.name.rsplit(".", 1)[0] + ".tab"
            data.update(filename=label, filesize=len(self.tab_bytes), tabularData=True,
                        originalFileFormat="text/csv", originalFileName=self.name,
                        originalFileSize=len(self.content))
        return {"label": label, "restricted": False, "version": 1, "dataFile": data}


class FakeDataverse:
    """Context manager: ``with FakeDataverse() as dv: dv.add(doi, FakeFile(...)); dv.url``."""

    def __init__(self, redirect: bool = False):
        self.datasets: dict = {}
        self.files: dict = {}
        self.faults: dict = {}
        self.always_corrupt: set = set()
        self.ignore_range: set = set()
        self.redirect = redirect
        self.requests: list = []
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    def add(self, doi: str, *files: FakeFile) -> None:
        self.datasets.setdefault(doi, [])
        for f in files:
            self.datasets[doi].append(f.file_id)
            self.files[f.file_id] = f

    def fault(self, file_id: int, *kinds: str) -> None:
        self.faults.setdefault(file_id, []).extend(kinds)

    def downloads(self, file_id: int | None = None) -> list:
        """Logged byte requests (path, query, range), optionally for one file id."""
        out = []
        for path, query, rng in self.requests:
            m = re.match(r"^/(?:api/access/datafile|store)/(\d+)$", path)
            if m and (file_id is None or int(m.group(1)) == file_id):
                if self.redirect and path.startswith("/api/"):
                    continue  # count the object-store request only
                out.append((path, query, rng))
        return out

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeDataverse":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                parsed = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                with owner._lock:
                    owner.requests.append((parsed.path, parsed.query, self.headers.get("Range")))
                if parsed.path == "/api/datasets/:persistentId/":
                    return self._dataset(query.get("persistentId", [""])[0])
                m = re.match(r"^/api/access/datafile/(\d+)$", parsed.path)
                if m and owner.redirect:
                    self.send_response(303)
                    self.send_header("Location", f"/store/{m.group(1)}?{parsed.query}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                m = m or re.match(r"^/store/(\d+)$", parsed.path)
                if m:
                    return self._file(int(m.group(1)), query.get("format", [""])[0] == "original")
                self._plain(404, b"not found")
                return None

            def _plain(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _dataset(self, doi: str) -> None:
                if doi not in owner.datasets:
                    body = {"status": "ERROR", "message": f"Dataset with Persistent ID {doi} not found."}
                    return self._plain(404, json.dumps(body).encode(), "application/json")
                files = [owner.files[i].entry() for i in owner.datasets[doi]]
                body = {"status": "OK", "data": {"id": 1, "latestVersion": {"files": files}}}
                return self._plain(200, json.dumps(body).encode(), "application/json")

            def _file(self, file_id: int, original: bool) -> None:
                f = owner.files.get(file_id)
                if f is None:
                    return self._plain(404, b"no such file")
                with owner._lock:
                    queue = owner.faults.get(file_id) or []
                    fault = queue.pop(0) if queue else None
                content = f.content if (original or not f.tabular) else f.tab_bytes
                if fault == "503":
                    return self._plain(503, b"Service Unavailable")
                if fault == "corrupt" or file_id in owner.always_corrupt:
                    content = bytes(b ^ 0x5A for b in content)
                start = 0
                rng = self.headers.get("Range")
                m = re.match(r"^bytes=(\d+)-$", rng or "")
                if m and file_id not in owner.ignore_range:
                    start = int(m.group(1))
                    if start >= len(content):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(content)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(content) - 1}/{len(content)}")
                else:
                    self.send_response(200)
                body = content[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "drop":
                    # Promise the whole body, send half, then hang up.
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return None
                self.wfile.write(body)
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def free_port() -> int:
    """A local port with nothing listening (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
