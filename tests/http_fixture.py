"""A real HTTP server on 127.0.0.1 for tests that must not touch the internet.

Routes are configured per path (status, body, headers, a truncated body, a gate that holds
the response back, a trickle of a few bytes per second, a Content-Length that lies or is absent,
a chunked body, a stream of zeros after the body) and every request is counted, so a test can
assert how many downloads and retries actually happened, and how many body bytes were sent.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that give up (retries, truncation tests) reset connections; that is expected.
        pass


@dataclass
class Route:
    """How the server answers one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    # Send only this many bytes of the body (Content-Length still announces all), then close.
    truncate_to: Optional[int] = None
    # When set, the response waits until the event is set (bounded by gate_timeout_s).
    gate: Optional[threading.Event] = None
    gate_timeout_s: float = 30.0
    # When set, the body is sent in 256-byte pieces at about this many bytes per second.
    trickle_bytes_per_s: Optional[float] = None
    headers: dict[str, str] = field(default_factory=dict)
    # Announce this Content-Length instead of the body's (a lie), or none at all (the body then
    # ends when the connection closes), or send the body with Transfer-Encoding: chunked.
    content_length: Optional[int] = None
    omit_content_length: bool = False
    chunked: bool = False
    # After the body, send this many zero bytes (10**12: endless), until the client goes away.
    zeros: int = 0


class LoopbackServer:
    """``ThreadingHTTPServer`` on an ephemeral loopback port, run in a daemon thread."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  # body bytes written per path (trickled or streamed)
        self.finished: Counter[str] = Counter()  # responses that ended (sent whole, or the client left)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
                with server._lock:
                    server.requests[self.path] += 1
                try:
                    self.answer(server.routes.get(self.path, Route(body=b"not found", status=404,
                                                                   content_type="text/plain")))
                finally:
                    with server._lock:
                        server.finished[self.path] += 1

            def answer(self, route: Route) -> None:
                if route.gate is not None:
                    route.gate.wait(route.gate_timeout_s)
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if route.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                elif not route.omit_content_length:
                    length = len(route.body) if route.content_length is None else route.content_length
                    self.send_header("Content-Length", str(length))
                for key, value in route.headers.items():
                    self.send_header(key, value)
                streamed = route.zeros or route.chunked or route.omit_content_length
                if route.truncate_to is not None or streamed:
                    self.send_header("Connection", "close")
                self.end_headers()
                if streamed:
                    self.stream(route)
                    return
                if route.truncate_to is not None:
                    self.wfile.write(route.body[: route.truncate_to])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if route.trickle_bytes_per_s is None:
                    self.wfile.write(route.body)
                    return
                for start in range(0, len(route.body), 256):
                    if server._stopping.wait(256 / route.trickle_bytes_per_s):
                        return
                    try:
                        self.wfile.write(route.body[start:start + 256])
                        self.wfile.flush()
                    except OSError:  # the client gave up (deadline, signal): stop sending
                        self.close_connection = True
                        return
                    with server._lock:
                        server.sent[self.path] += len(route.body[start:start + 256])

            def stream(self, route: Route) -> None:
                """The body, then ``route.zeros`` zero bytes, in 64 KiB pieces until the client leaves."""
                self.close_connection = True
                pieces = (route.body[i:i + 65536] for i in range(0, len(route.body), 65536))
                zeros = (b"\0" * min(65536, route.zeros - i) for i in range(0, route.zeros, 65536))
                try:
                    for piece in (p for source in (pieces, zeros) for p in source):
                        if server._stopping.is_set():
                            return
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if route.chunked else piece)
                        with server._lock:
                            server.sent[self.path] += len(piece)
                    if route.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:  # the client closed the connection: stop sending
                    return

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, route: Route) -> str:
        """Serve ``route`` at ``path``; return its URL."""
        self.routes[path] = route
        return self.url(path)

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests[path]

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def bytes_sent(self, path: str) -> int:
        with self._lock:
            return self.sent[path]

    def responses_ended(self, path: str) -> int:
        with self._lock:
            return self.finished[path]

    def stop(self) -> None:
        self._stopping.set()
        for route in self.routes.values():
            if route.gate is not None:
                route.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
