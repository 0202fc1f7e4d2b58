"""A flaky object store for tests: an HTTP proxy on loopback in front of a real S3 endpoint (moto's server) that
fails a share of the requests it sees, the way stores fail in production.

Each request is forwarded unless, with probability ``rate`` (a seeded RNG: the same sequence of decisions every
run), it draws one fault, uniformly among

- ``http_500``: ``500 InternalError`` (S3's XML error body); the request never reaches the store;
- ``http_503``: ``503 SlowDown`` (S3's throttling reply); never reaches the store;
- ``drop_before``: the connection is closed without a reply; never reaches the store;
- ``drop_after``: the request is applied by the store, then the connection is closed without a reply (the
  client cannot know that its write happened);
- ``drop_mid_body``: the store's reply is sent with its full ``Content-Length`` but only half its body, then the
  connection is closed (a read that breaks off; replies without a body are dropped as ``drop_after``).

Requests and faults are counted by kind (thread-safe). Nothing here is mocked: the client (s3fs/botocore in
the process under test) talks HTTP/1.1 to this proxy, which talks HTTP/1.1 to the store.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("http_500", "http_503", "drop_before", "drop_after", "drop_mid_body")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "content-length"}
ERRORS = {
    "http_500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "http_503": (503, "SlowDown", "Please reduce your request rate."),
}


class FaultyProxy:
    """``FaultyProxy(upstream_url, rate=0.25, seed=0)``; ``start()`` -> its URL; ``stop()``; ``counts()``.
    ``faults``: the kinds drawn from; ``only``: a regular expression, faults only for requests (``METHOD path``)
    that it matches."""

    def __init__(self, upstream: str, rate: float = 0.25, seed: int = 0, faults: tuple[str, ...] = FAULTS,
                 only: str | None = None):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rate, self.faults = rate, tuple(faults)
        self.only = re.compile(only) if only else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault) of every fault, in order
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------------------

    def start(self) -> str:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def counts(self) -> dict:
        """``requests`` (all), ``requests_<METHOD>``, ``faults`` (all) and one count per fault kind."""
        with self._lock:
            c = dict(self._counts)
        return {"requests": c.get("requests", 0), "faults": sum(c.get(k, 0) for k in FAULTS),
                **{k: c.get(k, 0) for k in FAULTS}, "upstream_error": c.get("upstream_error", 0), **{k: v for k, v in sorted(c.items()) if k.startswith("requests_")}}

    def _draw(self, method: str, path: str) -> str | None:
        with self._lock:
            self._counts["requests"] += 1
            self._counts[f"requests_{method}"] += 1
            if self.only is not None and not self.only.search(f"{method} {path}"):
                return None
            return self._rng.choice(self.faults) if self._rng.random() < self.rate else None

    def _record(self, fault: str, method: str, path: str) -> None:
        with self._lock:
            self._counts[fault] += 1
            self.log.append((method, path, fault))


class _Handler(BaseHTTPRequestHandler):
    owner: FaultyProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as clients expect of S3; replies always carry Content-Length

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    # ------------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "expect":
                    conn.putheader(k, v)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            r = conn.getresponse()
            data = r.read()
            return r.status, r.reason, r.getheaders(), data
        finally:
            conn.close()

    def _drop(self) -> None:
        """Close the connection at once (RST), without a reply or with what was already sent."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
               send_bytes: int | None = None) -> None:
        self.send_response_only(status, reason)
        length = None
        for k, v in headers:
            if k.lower() == "content-length":
                length = v
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        if self.command == "HEAD":  # no body; the length is the object's
            self.send_header("Content-Length", length if length is not None else "0")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if send_bytes is None else body[:send_bytes])

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.owner._draw(self.command, self.path)
        if fault == "drop_before":
            self.owner._record(fault, self.command, self.path)
            return self._drop()
        if fault in ERRORS:
            self.owner._record(fault, self.command, self.path)
            status, code, message = ERRORS[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<Resource>{self.path.split('?', 1)[0]}</Resource><RequestId>faulty-proxy</RequestId>"
                   "</Error>").encode()
            return self._reply(status, "", [("Content-Type", "application/xml")], xml)
        try:
            status, reason, headers, data = self._forward(body)
        except OSError:  # the store itself failed: the client sees a dropped connection
            self.owner._record("upstream_error", self.command, self.path)
            return self._drop()
        if fault == "drop_mid_body" and (len(data) < 2 or self.command == "HEAD"):
            fault = "drop_after"
        if fault:
            self.owner._record(fault, self.command, self.path)
        if fault == "drop_after":
            return self._drop()
        if fault == "drop_mid_body":
            self._reply(status, reason, headers, data, send_bytes=len(data) // 2)
            return self._drop()
        self._reply(status, reason, headers, data)
