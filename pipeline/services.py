"""Start and stop local servers (moto, Label Studio, static files) on loopback, and stop them by PID.

Used by tests, the demo and benchmarks, so every server the project starts is started the same way:
a free port on 127.0.0.1, a log file, a readiness probe over HTTP, and a stop that kills the whole
process group so no child outlives its test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        stop_pid(self.process, timeout)


def stop_pid(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(5)


def http_ok(url: str, accept: Callable[[int, bytes], bool] = lambda status, body: status < 500) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return accept(resp.status, resp.read(65536))
    except urllib.error.HTTPError as exc:
        return accept(exc.code, b"")
    except (OSError, ValueError):
        return False


def start_service(
    name: str,
    cmd: list[str],
    *,
    url: str,
    ready_path: str = "/",
    accept: Callable[[int, bytes], bool] = lambda status, body: status < 500,
    env: dict[str, str] | None = None,
    log_path: Path,
    timeout: float = 60.0,
    cwd: str | None = None,
) -> Service:
    """Start `cmd` in its own process group and wait until GET url+ready_path is accepted.

    With an empty `url` (a process that serves no HTTP, e.g. Airflow's scheduler) it returns once started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    process = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, start_new_session=True, cwd=cwd,
    )
    log.close()
    service = Service(name, process, url.rstrip("/"), log_path)
    if not url:
        return service
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before it was ready:\n{service.log_tail()}")
        if http_ok(service.url + ready_path, accept):
            return service
        time.sleep(0.5)
    service.stop()
    raise TimeoutError(f"{name} not ready at {service.url}{ready_path} after {timeout:.0f}s:\n{service.log_tail()}")


@dataclass
class ThreadServer:
    """An HTTP server of this process, serving from a daemon thread (fixtures, the demo's offline API)."""

    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_in_thread(server: ThreadingHTTPServer, name: str = "http") -> threading.Thread:
    """Start `server.serve_forever` in a daemon thread and return the thread."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def start_moto(log_dir: Path) -> Service:
    """A moto S3 server on a free loopback port (`moto_server -H 127.0.0.1`)."""
    import sys

    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    return start_service(
        "moto", [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        url=f"http://127.0.0.1:{port}", ready_path="/moto-api/", log_path=log_dir / "moto.log", timeout=60,
    )
