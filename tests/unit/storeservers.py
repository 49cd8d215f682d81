"""Real servers on loopback for the model store's tests: a file server speaking Fleet's
manifest format, a Hugging Face Hub mirror (the endpoints of shared/TEST-SERVERS.md) and moto's
S3 server. Each runs in a thread of the test process, records what it was asked (so tests
assert Range headers and request counts), and can cut a file's body after N bytes, as a broken
connection would.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import trio
from moto.server import ThreadedMotoServer

from fleet.agent.store import ModelStore, StoreConfig

GATE_TIMEOUT_S = 30.0  # a bounded wait, so a broken test fails instead of hanging


@dataclass
class Faults:
    """What a server records and how it misbehaves.

    Attributes:
        requests: (method, path, Range header or "") of every request, in order.
        cut_after: path suffix → bytes to send of that file's body before dropping the
            connection.
        gate: when set to an unset Event, file bodies wait for it (bounded) before sending.
    """

    requests: list[tuple[str, str, str]] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)
    gate: threading.Event | None = None
    arrived: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, path: str, range_header: str) -> None:
        with self.lock:
            self.requests.append((method, path, range_header))

    def cut_for(self, path: str) -> int | None:
        for suffix, n in self.cut_after.items():
            if path.endswith(suffix):
                return n
        return None

    def wait_gate(self) -> None:
        self.arrived.set()
        if self.gate is not None and not self.gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")

    async def wait_arrival(self) -> None:
        """Wait (bounded) until a file body is about to be sent (held there by ``gate``)."""
        if not await trio.to_thread.run_sync(self.arrived.wait, GATE_TIMEOUT_S):
            raise TimeoutError("no file request reached the server")

    def gets(self, suffix: str) -> list[str]:
        """The Range headers of every GET of a path ending in ``suffix``."""
        with self.lock:
            return [r for m, p, r in self.requests if m == "GET" and p.endswith(suffix)]


def parse_range(header: str, size: int) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return min(int(match[1]), size) if match else 0


class _Server(ThreadingHTTPServer):
    """Joins its handler threads on close, after cutting the connections clients keep alive
    (huggingface_hub's session pools them), so no thread outlives the test."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.open: set[socket.socket] = set()
        self.open_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self.open_lock:
            self.open.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self.open_lock:
            self.open.discard(request)
        super().shutdown_request(request)

    def cut_all(self) -> None:
        with self.open_lock:
            conns = list(self.open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler


class _Loopback:
    """An HTTP server on 127.0.0.1:0 serving in a thread the test owns (close() joins it)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.faults = Faults()
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="loopback-http")
        self.thread.start()  # the socket listens already: no readiness wait

    def close(self) -> None:
        if self.faults.gate is not None:
            self.faults.gate.set()
        self.httpd.shutdown()
        self.httpd.cut_all()
        self.httpd.server_close()
        self.thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    @property
    def owner(self) -> Any:
        return self.server.owner  # type: ignore[attr-defined]

    def send_json(
        self, doc: object, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_404(self, headers: dict[str, str] | None = None) -> None:
        self.send_json({"error": "not found"}, 404, headers)

    def send_file(self, data: bytes, *, head: bool, headers: dict[str, str] | None = None) -> None:
        faults: Faults = self.owner.faults
        start = parse_range(self.headers.get("Range", ""), len(data))
        body = data[start:]
        self.send_response(HTTPStatus.PARTIAL_CONTENT if start else HTTPStatus.OK)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        faults.wait_gate()
        cut = faults.cut_for(urlsplit(self.path).path)
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[: max(cut - start, 0)])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


# -- a folder with a Fleet manifest -------------------------------------------------------------


def manifest_doc(files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "files": [
            {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for p, d in sorted(files.items())
        ]
    }


class FileServer(_Loopback):
    """Serves folders under ``/NAME/``: ``fleet-manifest.json`` and the files.

    ``folders[NAME]`` maps paths to bytes; ``manifests[NAME]`` overrides the manifest served.
    """

    def __init__(self) -> None:
        self.folders: dict[str, dict[str, bytes]] = {}
        self.manifests: dict[str, dict[str, Any]] = {}
        super().__init__(_FileHandler)


class _FileHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802
        server: FileServer = self.owner
        path = unquote(urlsplit(self.path).path)
        server.faults.record("GET", path, self.headers.get("Range", ""))
        name, _, rel = path.lstrip("/").partition("/")
        folder = server.folders.get(name)
        if folder is None:
            return self.send_404()
        if rel == "fleet-manifest.json":
            return self.send_json(server.manifests.get(name) or manifest_doc(folder))
        if rel not in folder:
            return self.send_404()
        self.send_file(folder[rel], head=False)


# -- a Hugging Face Hub mirror ------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HfMirror(_Loopback):
    """The Hub endpoints huggingface_hub calls (shared/TEST-SERVERS.md).

    ``repos[REPO]`` maps paths to bytes; ``*.safetensors`` files are served as LFS files (with
    their SHA-256), others as plain git blobs. Every repository has one commit, ``COMMIT``,
    reachable as ``main`` too. ``served[REPO]`` overrides the bytes served (to corrupt a file).
    """

    COMMIT = "a" * 40

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.served: dict[str, dict[str, bytes]] = {}
        super().__init__(_HfHandler)

    def tree(self, repo: str) -> list[dict[str, Any]]:
        out = []
        for path, data in sorted(self.repos[repo].items()):
            item: dict[str, Any] = {
                "type": "file",
                "path": path,
                "size": len(data),
                "oid": git_blob_sha1(data),
            }
            if path.endswith(".safetensors"):
                sha = hashlib.sha256(data).hexdigest()
                item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
            out.append(item)
        return out


_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<what>revision|tree)/(?P<rev>[^/]+))?")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


class _HfHandler(_Handler):
    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        mirror: HfMirror = self.owner
        path = unquote(urlsplit(self.path).path)
        mirror.faults.record("HEAD" if head else "GET", path, self.headers.get("Range", ""))
        if m := _API.fullmatch(path):
            repo = m["repo"]
            if repo not in mirror.repos:
                return self.send_404({"X-Error-Code": "RepoNotFound"})
            if m["rev"] not in (None, "main", mirror.COMMIT):
                return self.send_404({"X-Error-Code": "RevisionNotFound"})
            if m["what"] == "tree":
                return self.send_json(mirror.tree(repo))
            siblings = [{"rfilename": p} for p in sorted(mirror.repos[repo])]
            return self.send_json({"id": repo, "sha": mirror.COMMIT, "siblings": siblings})
        if m := _RESOLVE.fullmatch(path):
            repo, rel = m["repo"], m["path"]
            files = mirror.repos.get(repo, {})
            if rel not in files:
                return self.send_404(
                    {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": mirror.COMMIT}
                )
            data = mirror.served.get(repo, {}).get(rel, files[rel])
            headers = {"X-Repo-Commit": mirror.COMMIT, "ETag": f'"{git_blob_sha1(files[rel])}"'}
            return self.send_file(data, head=head, headers=headers)
        self.send_404()


# -- moto's S3 server ---------------------------------------------------------------------------


class RecordingMotoServer(ThreadedMotoServer):
    """moto's threaded server, its WSGI app wrapped to record requests and cut bodies."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.faults = Faults()

    @property
    def url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = _Recording(DomainDispatcherApplication(create_backend_app), self.faults)
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class _Recording:
    def __init__(self, app: Callable[..., Iterable[bytes]], faults: Faults) -> None:
        self.app = app
        self.faults = faults

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = unquote(environ.get("PATH_INFO", ""))
        method = environ["REQUEST_METHOD"]
        self.faults.record(method, path, environ.get("HTTP_RANGE", ""))
        body = self.app(environ, start_response)
        cut = self.faults.cut_for(path) if method == "GET" else None
        if cut is None or environ.get("HTTP_RANGE"):
            return body
        return _cut(body, cut)


def _cut(body: Iterable[bytes], n: int) -> Iterator[bytes]:
    sent = 0
    for chunk in body:
        if sent + len(chunk) >= n:
            yield chunk[: n - sent]
            raise ConnectionAbortedError("cut by the test")  # werkzeug drops the connection
        sent += len(chunk)
        yield chunk


# -- the store under test -----------------------------------------------------------------------


@asynccontextmanager
async def running_store(cfg: StoreConfig, **kwargs: Any) -> AsyncIterator[ModelStore]:
    """A :class:`ModelStore` running in a nursery of the test; stopped on exit."""
    store = ModelStore(cfg, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


def model_files(weights_bytes: int, seed: int = 0) -> dict[str, bytes]:
    """A small model folder: config.json, a tokenizer file and ``weights_bytes`` of weights."""
    weights = random.Random(seed).randbytes(weights_bytes)
    return {
        "config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "model.safetensors": weights,
    }
