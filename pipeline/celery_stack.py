"""Airflow on the CeleryExecutor on one machine, and the settings that stack proves for the deployment files.

`start_celery_stack` starts, each as its own process on 127.0.0.1 and stopped by PID: PostgreSQL (initdb in a data
folder; Airflow's metadata database and Celery's result backend), Redis (the Celery broker, with a password), then
Airflow's api-server, scheduler and dag-processor (`airflow_local.start_stack`) and N Celery workers. The tests
(`tests/test_airflow_celery.py`), the benchmark (`benchmarks/celery_scale.py`) and `synsetforge airflow up
--executor celery` use it.

The settings below (`celery_settings`, `WORKER_COMMAND`, `SHARED_SECRETS`) are what that stack runs with; the
compose file and the Helm values in infra/deploy/ must say the same, and `infra/deploy/check.py` reads this module
to hold them to it. What only makes sense with several workers on one machine (a worker name per process, a PID
file each, no log server because the logs folder is shared) is in `local_worker_command` and not checked there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.airflow_local import Stack, airflow_bin, start_stack
from pipeline.services import Postgres, Redis, Service, TreeService, start_postgres, start_redis, start_service

# ------------------------------------------------------------------ the proven settings (infra/deploy/check.py)

EXECUTOR = "CeleryExecutor"
METADATA_DRIVER = "postgresql+psycopg2"  # SQLAlchemy URL of the metadata database
# Celery's database result backend, on the same database. The driver is named: SQLAlchemy 2.1 reads a bare
# postgresql:// as psycopg 3, which the lock does not hold.
RESULT_BACKEND_DRIVER = "db+postgresql+psycopg2"
BROKER_SCHEME = "redis"
WORKER_COMMAND = ("airflow", "celery", "worker")
# Task tokens are signed by the api-server / scheduler and checked by the workers' execution API calls; the Fernet
# key decrypts connections everywhere: every Airflow process of an installation needs the same values.
SHARED_SECRETS = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY")
WORKER_NAME_VAR = "SYNSETFORGE_WORKER_NAME"
# The servers the stack runs (Debian 12's postgresql-15 and redis-server 7.0, found by services.postgres_binary and
# start_redis): the PostgreSQL major and the Redis major.minor. The deploy files' postgres / redis images must be
# these versions (check.py); tests/test_airflow_celery.py asserts the running servers report them.
TESTED_VERSIONS = {"postgres": "15", "redis": "7.0"}


def metadata_url(user: str, password: str, host: str, port: int | str, database: str) -> str:
    return f"{METADATA_DRIVER}://{user}:{password}@{host}:{port}/{database}"


def celery_settings(*, db_user: str, db_password: str, db_host: str, db_port: int | str, db_name: str,
                    redis_password: str, redis_host: str, redis_port: int | str, concurrency: int | str) -> dict[str, str]:
    """The Airflow variables of a CeleryExecutor installation: metadata DB and result backend on one PostgreSQL
    database, broker on Redis database 0 with a password, `concurrency` task slots per worker."""
    return {
        "AIRFLOW__CORE__EXECUTOR": EXECUTOR,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url(db_user, db_password, db_host, db_port, db_name),
        "AIRFLOW__CELERY__RESULT_BACKEND":
            f"{RESULT_BACKEND_DRIVER}://{db_user}:{db_password}@{db_host}:{db_port}/{db_name}",
        "AIRFLOW__CELERY__BROKER_URL": f"{BROKER_SCHEME}://:{redis_password}@{redis_host}:{redis_port}/0",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
    }


def local_worker_command(name: str, pid_file: Path) -> list[str]:
    """WORKER_COMMAND for one of several workers on one machine: its own Celery node name and PID file (two
    workers in one AIRFLOW_HOME would otherwise share airflow-worker.pid), and no log server (every worker writes
    into the same logs folder the api-server reads, and a second log server could not bind the same port)."""
    return [airflow_bin(), *WORKER_COMMAND[1:], "--celery-hostname", f"{name}@%h", "--pid", str(pid_file),
            "--skip-serve-logs"]


def worker_hostname() -> str:
    """Airflow's `[core] hostname_callable` for the local stack: the worker's name (worker-1, ...), so task
    instances say which worker ran them; the machine's name in processes that are no worker."""
    from airflow.utils.net import getfqdn

    return os.environ.get(WORKER_NAME_VAR) or getfqdn()


# ------------------------------------------------------------------ the stack


@dataclass
class CeleryStack(Stack):
    """The UI stack plus PostgreSQL, Redis and the Celery workers (`workers`, named by `worker_names`)."""

    postgres: Postgres | None = None
    redis: Redis | None = None
    workers: list[Service] = field(default_factory=list)
    worker_names: list[str] = field(default_factory=list)

    def worker(self, name: str) -> Service:
        return self.workers[self.worker_names.index(name)]


def _secrets(home: Path) -> dict[str, str]:
    """The shared secrets of this home, made once and kept (0600) so a restarted stack still reads its data."""
    from cryptography.fernet import Fernet

    path = home / "celery-secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
              "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
              "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode()}
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return values


def wait_for_log(service: Service, pattern: str, timeout: float) -> None:
    """Wait until `service`'s log matches `pattern` (Celery prints `<name>@<host> ready.` once it consumes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with code {service.process.returncode}:\n{service.log_tail()}")
        if re.search(pattern, service.log_path.read_text(errors="replace") if service.log_path.exists() else ""):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{service.name}: no {pattern!r} in its log after {timeout:.0f}s:\n{service.log_tail()}")


def start_celery_stack(home: Path | str, *, workers: int = 2, concurrency: int = 2, data_dir: Path | None = None,
                       env: dict[str, str] | None = None, port: int | None = None, password: str | None = None,
                       log_dir: Path | None = None, heartbeat_timeout: int | None = None,
                       fsync: bool = True, timeout: float = 240.0) -> CeleryStack:
    """PostgreSQL + Redis (their files under `data_dir`, default `home`/celery), then api-server, scheduler,
    dag-processor and `workers` Celery workers of `concurrency` slots each, all on 127.0.0.1.

    `env` reaches every Airflow process (SYNSETFORGE__... settings for asset-triggered runs, failpoints).
    `heartbeat_timeout` shortens how long a task whose worker died stays `running` before the scheduler fails it
    (and so retries it on a live worker): Airflow's default is 300 s.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir or home / "celery").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or home / "logs"
    owned: list[Service] = []
    pg = redis = None
    try:
        pg = start_postgres(data_dir / "postgres", fsync=fsync, log_path=log_dir / "postgres.log")
        owned.append(pg.service)
        pg.create_database("airflow")
        redis = start_redis(data_dir / "redis", log_path=log_dir / "redis.log")
        owned.append(redis.service)
        full = {
            **celery_settings(db_user=pg.user, db_password=pg.password, db_host=pg.host, db_port=pg.port,
                              db_name="airflow", redis_password=redis.password, redis_host=redis.host,
                              redis_port=redis.port, concurrency=concurrency),
            **_secrets(home),
            "AIRFLOW__CORE__PARALLELISM": str(workers * concurrency),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
            **({"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(heartbeat_timeout)}
               if heartbeat_timeout else {}),
            **(env or {}),
        }
        stack = start_stack(home, env=full, port=port, password=password, log_dir=log_dir, timeout=timeout)
    except BaseException:
        for service in reversed(owned):
            service.stop()
        raise
    celery = CeleryStack(home=stack.home, url=stack.url, username=stack.username, password=stack.password,
                         services=[*owned, *stack.services], env=stack.env, postgres=pg, redis=redis)
    try:
        for i in range(1, workers + 1):
            name = f"worker-{i}"
            base = start_service(name, local_worker_command(name, home / f"{name}.pid"), url="",
                                 env={**stack.env, WORKER_NAME_VAR: name}, log_path=log_dir / f"{name}.log")
            service = TreeService(base.name, base.process, base.url, base.log_path)
            celery.services.append(service)
            celery.workers.append(service)
            celery.worker_names.append(name)
        for service in celery.workers:
            wait_for_log(service, r"@\S+ ready\.", timeout)
    except BaseException:
        celery.stop()
        raise
    return celery


def describe(stack: CeleryStack) -> list[str]:
    """What was started, one line each (printed by `synsetforge airflow up --executor celery`)."""
    lines = []
    for s in stack.services:
        what = {"postgres": f"PostgreSQL 127.0.0.1:{stack.postgres.port} (metadata DB + Celery results), data "
                            f"{stack.postgres.data_dir}" if stack.postgres else "",
                "redis": f"Redis 127.0.0.1:{stack.redis.port} (Celery broker)" if stack.redis else ""}.get(s.name, "")
        lines.append(f"  {s.name:22s} pid {s.pid}  log {s.log_path}" + (f"  {what}" if what else ""))
    return lines


def run_until_interrupted(stack: Any, print_fn: Any = print) -> int:
    """Block until Ctrl-C (0) or until one of the stack's processes exits (1, with its last log lines)."""
    try:
        while all(s.process.poll() is None for s in stack.services):
            time.sleep(1)
        dead = [s for s in stack.services if s.process.poll() is not None]
        print_fn(f"{dead[0].name} exited (code {dead[0].process.returncode}); last lines:\n{dead[0].log_tail()}")
        return 1
    except KeyboardInterrupt:
        return 0
