"""A fault-injecting HTTP proxy in front of moto's S3 server, on 127.0.0.1.

Requests pass through to moto unchanged unless a rule matches them; a matching rule answers
with an S3 error instead (503 SlowDown for throttling, 500 InternalError, 403 AccessDenied…),
``times`` times. Ray workers, s3fs and Lance's own object-store client all reach it like any
S3 endpoint, so the code under test sees real S3 errors on the wire, not mocks.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


@dataclass
class Rule:
    method: str  # GET, PUT, … ("*": any)
    path: str  # a regular expression searched in the request path
    status: int  # the error to answer with
    times: int = 1_000_000  # how many matching requests fail (the rest pass)
    skip: int = 0  # let this many matching requests through first ("half-way")
    hits: int = 0  # matching requests seen
    failed: int = 0  # of which answered with the error
    header: str = ""  # only requests carrying this header (e.g. "Range")

    def matches(self, method: str, path: str, headers) -> bool:
        return (
            (self.method in ("*", method))
            and re.search(self.path, path) is not None
            and (not self.header or self.header in headers)
        )


@dataclass
class FaultProxy:
    upstream: str  # host:port of moto
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                if (rule := proxy.fault(self.command, self.path, self.headers)) is not None:
                    code = _CODES.get(rule.status, "InternalError")
                    xml = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                # a HEAD answer has no body but tells the object's length
                self.send_header(
                    "Content-Length",
                    resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fault(self, method: str, path: str, headers) -> Rule | None:
        with self.lock:
            self.seen.append((method, path))
            for rule in self.rules:
                if rule.matches(method, path, headers):
                    rule.hits += 1
                    if rule.hits > rule.skip and rule.failed < rule.times:
                        rule.failed += 1
                        return rule
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
