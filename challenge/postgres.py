"""A throwaway PostgreSQL server for tests and benchmarks: initdb in a temp folder, a free loopback port,
stopped by PID. Debian's PostgreSQL 15 binaries (/usr/lib/postgresql/15/bin); never the system service.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user the Debian package made
(the temp folder is handed to it).

    pg = start_postgres(Path("/tmp/pg-log"))
    url = pg.url            # postgresql+psycopg2://postgres@127.0.0.1:<port>/postgres
    pg.stop()
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.services import free_port, stop_pid

BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


def pg_bin(name: str) -> str:
    for d in BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install Debian's postgresql package (infra/setup.sh does)")
    return found


@dataclass
class Postgres:
    process: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        stop_pid(self.process, 30)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_postgres(log_dir: Path, timeout: float = 60.0) -> Postgres:
    log_dir.mkdir(parents=True, exist_ok=True)
    root = os.geteuid() == 0
    user = "postgres" if root else None
    data = Path(tempfile.mkdtemp(prefix="sf-pg-"))
    if root:
        pw = pwd.getpwnam("postgres")
        os.chown(data, pw.pw_uid, pw.pw_gid)
    subprocess.run([pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, user=user, cwd="/tmp")
    port = free_port()
    log_path = log_dir / f"postgres-{port}.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen([pg_bin("postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                             "-k", str(data), "-c", "fsync=off", "-c", "max_connections=200"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            user=user, cwd="/tmp")
    log.close()
    pg = Postgres(proc, port, data, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        ok = subprocess.run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
                            capture_output=True)
        if ok.returncode == 0:
            return pg
        time.sleep(0.3)
    pg.stop()
    raise TimeoutError(f"postgres not ready on port {port}: {log_path.read_text()[-2000:]}")
