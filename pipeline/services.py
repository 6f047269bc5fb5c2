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
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------- non-HTTP servers: PostgreSQL, Redis; process trees


def wait_for_tcp(service: Service, host: str, port: int, timeout: float = 60.0) -> None:
    """Wait until `host:port` accepts a TCP connection (for servers with no HTTP probe); stop `service` on failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with code {service.process.returncode} before it was ready:\n"
                               f"{service.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    service.stop()
    raise TimeoutError(f"{service.name} not listening on {host}:{port} after {timeout:.0f}s:\n{service.log_tail()}")


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (children first reparent when their parent dies, so read this before)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(process: subprocess.Popen) -> list[int]:
    """SIGKILL a process and everything below it, whatever process group each is in (a machine that dies takes a
    Celery worker, its pool and the task runners it forked into their own groups all at once). Returns the PIDs."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(10)
    return pids


@dataclass
class TreeService(Service):
    """A server whose children leave its process group (Airflow's task runners): a stop also kills what is left."""

    def stop(self, timeout: float = 20.0) -> None:
        below = descendants(self.pid) if self.process.poll() is None else []
        stop_pid(self.process, timeout)
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class PostgresService(Service):
    """The postmaster: stopped with SIGINT (fast shutdown: open sessions are ended, not waited for)."""

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGINT)
                self.process.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        stop_pid(self.process, 5)


def postgres_binary(name: str) -> Path:
    """`initdb` / `postgres` from the machine's PostgreSQL (Debian keeps them in /usr/lib/postgresql/N/bin)."""
    import shutil

    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(f"PostgreSQL's {name} not found: install the postgresql package (infra/setup.sh does)")


def _postgres_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: it refuses to run as root, so root runs it as the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    import pwd

    user = pwd.getpwnam("postgres")
    return user.pw_uid, user.pw_gid


def _as_unprivileged(cmd: list[str], owner: Path) -> list[str]:
    ids = _postgres_user()
    if ids is None:
        return cmd
    for path in [owner, *owner.rglob("*")]:
        os.chown(path, *ids)
    for parent in owner.parents:  # the unprivileged server must reach its folder
        if not parent.stat().st_mode & 0o001:
            raise PermissionError(f"PostgreSQL runs as the postgres user, which cannot enter {parent}: put its data "
                                  f"folder under a folder others may traverse (chmod o+x {parent})")
    return ["setpriv", f"--reuid={ids[0]}", f"--regid={ids[1]}", "--init-groups", *cmd]


@dataclass
class Postgres:
    """A PostgreSQL server of ours on 127.0.0.1 (password login) and its superuser."""

    service: PostgresService
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    data_dir: Path

    def url(self, database: str, driver: str = "postgresql") -> str:
        """`driver://user:password@host:port/database` (SQLAlchemy drivers: postgresql+psycopg2, db+postgresql)."""
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` unless it exists."""
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def query(self, database: str, sql: str, args: tuple = ()) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    @property
    def pid(self) -> int:
        return self.service.pid

    def stop(self) -> None:
        self.service.stop()


def start_postgres(data_dir: Path, *, port: int | None = None, user: str = "synsetforge", password: str | None = None,
                   log_path: Path | None = None, fsync: bool = True, timeout: float = 120.0) -> Postgres:
    """PostgreSQL on 127.0.0.1:`port` with its cluster in `data_dir` (initdb on first use; a second start reuses
    it and the password saved beside it). TCP only: the Unix socket lives in the data folder. `fsync=False` is
    for throw-away test clusters."""
    import secrets

    data_dir = Path(data_dir).resolve()
    secret_file = data_dir.with_name(data_dir.name + ".password")
    if not (data_dir / "PG_VERSION").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        if any(data_dir.iterdir()):
            raise RuntimeError(f"{data_dir} is neither empty nor a PostgreSQL data folder")
        password = password or secrets.token_urlsafe(18)
        pwfile = data_dir.with_name(data_dir.name + ".initpw")
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if _postgres_user():
            os.chown(pwfile, *_postgres_user())  # read by the unprivileged initdb, deleted below
        try:
            init = subprocess.run(_as_unprivileged(
                [str(postgres_binary("initdb")), "-D", str(data_dir), "-U", user, f"--pwfile={pwfile}",
                 "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
                data_dir), capture_output=True, text=True)
        finally:
            pwfile.unlink()
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        secret_file.write_text(password)
        secret_file.chmod(0o600)
    else:
        password = password or secret_file.read_text().strip()
    port = port or free_port()
    cmd = _as_unprivileged([str(postgres_binary("postgres")), "-D", str(data_dir), "-p", str(port),
                            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data_dir}",
                            "-c", "max_connections=200", "-c", f"fsync={'on' if fsync else 'off'}"], data_dir)
    log_path = log_path or data_dir.with_name(data_dir.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = start_service("postgres", cmd, url="", log_path=log_path)
    service = PostgresService(base.name, base.process, base.url, base.log_path)
    pg = Postgres(service, "127.0.0.1", port, user, password, data_dir)
    wait_for_tcp(service, "127.0.0.1", port, timeout)
    deadline = time.monotonic() + timeout
    while True:  # listening comes before accepting logins (startup recovery)
        try:
            pg.query("postgres", "SELECT 1")
            return pg
        except Exception:  # noqa: BLE001 - psycopg2.OperationalError while the server starts up
            if time.monotonic() > deadline or service.process.poll() is not None:
                service.stop()
                raise RuntimeError(f"postgres did not accept logins on port {port}:\n{service.log_tail()}") from None
            time.sleep(0.5)


@dataclass
class Redis:
    """A Redis server of ours on 127.0.0.1 with a password (the Celery broker)."""

    service: Service
    host: str
    port: int
    password: str = field(repr=False)

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/{db}"

    @property
    def pid(self) -> int:
        return self.service.pid

    def stop(self) -> None:
        self.service.stop()


def start_redis(data_dir: Path, *, port: int | None = None, password: str | None = None,
                log_path: Path | None = None, timeout: float = 30.0) -> Redis:
    """`redis-server` on 127.0.0.1:`port` with its files in `data_dir` (no snapshots: the broker's queue only)."""
    import secrets
    import shutil

    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server not found: install the redis-server package (infra/setup.sh does)")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    password = password or secrets.token_urlsafe(18)
    conf = data_dir / "redis.conf"  # the password in a file of ours, not on the command line other users can read
    conf.write_text(f"requirepass {password}\n")
    conf.chmod(0o600)
    cmd = [exe, str(conf), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
           "--save", "", "--appendonly", "no", "--protected-mode", "yes"]
    service = start_service("redis", cmd, url="", log_path=log_path or data_dir / "redis.log")
    wait_for_tcp(service, "127.0.0.1", port, timeout)
    return Redis(service, "127.0.0.1", port, password)
