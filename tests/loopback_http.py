"""A tiny threaded HTTP server on 127.0.0.1 for source and ingest tests: each test installs a handler function.

`handler(req) -> (status, headers, body)` or a callable that writes the response itself (for drips and hangs).
Runs in a daemon thread inside the test process; stopped at fixture teardown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.services import ThreadServer, serve_in_thread


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_path: str


@dataclass
class Loopback(ThreadServer):
    handler: Callable[[Request, BaseHTTPRequestHandler], Any] | None = None
    requests: list[Request] = field(default_factory=list)


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(doc).encode()


def drip(h: BaseHTTPRequestHandler, chunk: bytes, times: int = 40, every_s: float = 0.1) -> None:
    """Write `chunk` `times` times, `every_s` apart (a slow server), then close; the client may hang up first."""
    import time

    try:
        for _ in range(times):
            h.wfile.write(chunk)
            h.wfile.flush()
            time.sleep(every_s)
    except (BrokenPipeError, ConnectionResetError):
        pass
    h.close_connection = True


def start_loopback() -> Loopback:
    box: dict[str, Loopback] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802
            lb = box["lb"]
            parts = urlsplit(self.path)
            req = Request(parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}, dict(self.headers), self.path)
            lb.requests.append(req)
            out = lb.handler(req, self) if lb.handler else (404, {}, b"no handler")
            if out is None:
                return  # the handler wrote the response itself
            status, headers, body = out
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # clients hanging up mid-response is what the hostile tests do on purpose

    server = Server(("127.0.0.1", 0), Handler)
    lb = Loopback(server, None)  # type: ignore[arg-type]  # the thread is set once the handler can find lb
    box["lb"] = lb
    lb.thread = serve_in_thread(server, "loopback")
    return lb
