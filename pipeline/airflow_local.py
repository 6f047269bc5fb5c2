"""A local Airflow for the project's DAGs: environment, metadata DB, `dag.test()` runs, and the UI stack.

Used by `make demo`, the tests and `synsetforge airflow up`. Airflow reads its configuration when it is first
imported, so `use_home()` must run before anything imports airflow. The stack (`start_stack`) is the one a data
engineer sees: api-server, scheduler (LocalExecutor) and dag-processor as separate processes on 127.0.0.1, each
in its own process group and stopped by PID. `pipeline.celery_stack` starts the same stack on the CeleryExecutor
(PostgreSQL, Redis, Celery workers); `synsetforge airflow up --executor celery` runs that one.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.services import Service, free_port, start_service

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "dags"


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def airflow_env(home: Path | str, *, parallelism: int = 2, executor: str = "LocalExecutor") -> dict[str, str]:
    """The variables every Airflow process of ours runs with (a temp home, our DAGs, no examples)."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "NLTK_DATA": os.environ.get("NLTK_DATA", str(ROOT / ".nltk_data")),
    }


def project_first_pythonpath() -> str:
    """PYTHONPATH for Airflow's own processes: task processes put the DAGs folder on sys.path, where dags/crowd.py
    would shadow the crowd package for a task's `import crowd.cli`; the project's root first keeps the package in
    front (only Airflow's processes get it: other servers, e.g. Label Studio's venv, must not see the checkout)."""
    return os.pathsep.join(dict.fromkeys([str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))


def use_home(home: Path | str, **kwargs: Any) -> dict[str, str]:
    """Point this process at `home` (call before importing airflow) and migrate its SQLite metadata DB."""
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(home):
        raise RuntimeError("airflow was imported before use_home(); its configuration cannot change any more")
    env = airflow_env(home, **kwargs)
    Path(home).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    migrate(env)
    return env


def migrate(env: dict[str, str]) -> None:
    result = subprocess.run([airflow_bin(), "db", "migrate"], capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{result.stderr[-3000:]}")


def load_dag(dag_id: str):
    """The DAG `dag_id` from dags/, failing loudly on any import error of the folder."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise KeyError(f"no DAG {dag_id!r} in {DAGS}")
    return dag


def run_dag_test(dag_id: str, conf: dict[str, Any] | None = None, *, retry_delay: timedelta | None = None):
    """One run of `dag_id` with dag.test() in this process; returns the DagRun (it does not raise on failure).

    dag.test() honours retries and waits out their delay; `retry_delay` shortens it (tests, the demo).
    """
    dag = load_dag(dag_id)
    if retry_delay is not None:
        for t in dag.tasks:
            t.retry_delay, t.retry_exponential_backoff = retry_delay, 0
    return dag.test(run_conf=conf or {})


def failed_tasks(run) -> list[str]:
    """task ids (with map index) of a DagRun that did not succeed, for error messages."""
    return [f"{ti.task_id}[{ti.map_index}]={ti.state}" for ti in run.get_task_instances()
            if ti.state not in ("success", "skipped")]


@dataclass
class Stack:
    """api-server + scheduler + dag-processor; `url` is the UI and REST API, `username`/`password` its login."""

    home: Path
    url: str
    username: str = "admin"
    password: str = field(default="", repr=False)
    services: list[Service] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # what every process of the stack runs with

    def token(self) -> str:
        """A JWT for the REST API (`Authorization: Bearer ...`), as the UI gets one at login."""
        req = urllib.request.Request(f"{self.url}/auth/token", method="POST",
                                     data=json.dumps({"username": self.username, "password": self.password}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["access_token"]

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def start_stack(home: Path | str, *, env: dict[str, str] | None = None, port: int | None = None,
                password: str | None = None, log_dir: Path | None = None, timeout: float = 240.0) -> Stack:
    """Start the UI stack on 127.0.0.1 for `home` (its SQLite metadata DB is migrated first).

    `env` adds variables for every process (e.g. SYNSETFORGE__STORE__URL for asset-triggered runs, which get no
    Params from the run that triggered them). Airflow's simple auth manager asks for a login: user `admin` with
    `password` (a new random one if None), kept in the home's passwords file.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or home / "logs"
    password = password or secrets.token_urlsafe(12)
    passwords = home / "simple_auth_manager_passwords.json"
    passwords.write_text(json.dumps({"admin": password}))
    passwords.chmod(0o600)
    full = {**airflow_env(home), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "PYTHONPATH": project_first_pythonpath(), **(env or {})}
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    full["AIRFLOW__API__BASE_URL"] = url
    full["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"{url}/execution/"
    migrate(full)
    stack = Stack(home, url, password=password, env=full)
    try:
        stack.services.append(start_service(
            "airflow-api-server", [airflow_bin(), "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
            url=url, ready_path="/api/v2/monitor/health", env=full, log_path=log_dir / "api-server.log",
            timeout=timeout))
        stack.services.append(start_service("airflow-dag-processor", [airflow_bin(), "dag-processor"], url="",
                                            env=full, log_path=log_dir / "dag-processor.log"))
        # LocalExecutor task logs are files the api-server reads; no log server listening on every interface.
        stack.services.append(start_service("airflow-scheduler", [airflow_bin(), "scheduler", "--skip-serve-logs"],
                                            url="", env=full, log_path=log_dir / "scheduler.log"))
    except BaseException:
        stack.stop()
        raise
    return stack


# ---------------------------------------------------------------- CLI: synsetforge airflow up


def register_cli(sub: Any) -> None:
    p = sub.add_parser("airflow", help="run the project's DAGs in a local Airflow (UI on 127.0.0.1)")
    actions = p.add_subparsers(dest="airflow_command", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start api-server + scheduler + dag-processor (+ Celery workers) until Ctrl-C")
    up.add_argument("--home", default=".airflow", help="AIRFLOW_HOME (metadata DB, logs); default ./.airflow")
    up.add_argument("--port", type=int, default=8080, help="UI / REST API port on 127.0.0.1 (0: a free one)")
    up.add_argument("--executor", choices=["local", "celery"], default="local",
                    help="local: LocalExecutor on SQLite (one machine, tasks two at a time); celery: CeleryExecutor "
                         "with PostgreSQL and Redis started from this machine's binaries, and Celery workers")
    up.add_argument("--workers", type=int, default=2, help="Celery workers (--executor celery); default 2")
    up.add_argument("--concurrency", type=int, default=2, help="task slots per Celery worker; default 2")
    up.add_argument("--data", default=None, help="PostgreSQL and Redis data folder (--executor celery); "
                                                  "default HOME/celery")
    up.set_defaults(func=_cli_up)


def _cli_up(args: Any, settings: Any) -> int:
    from pipeline.celery_stack import describe, run_until_interrupted, start_celery_stack

    home = Path(args.home).resolve()
    # Asset-triggered runs get no Params: they read the store from the configuration the stack inherits.
    store = settings.store.url if "://" in settings.store.url else str(Path(settings.store.url).resolve())
    env = {"SYNSETFORGE__STORE__URL": store}
    if settings.store.s3_endpoint_url:
        env["SYNSETFORGE__STORE__S3_ENDPOINT_URL"] = settings.store.s3_endpoint_url
    celery = args.executor == "celery"
    print(f"starting Airflow (home {home}, {'CeleryExecutor' if celery else 'LocalExecutor'}) ...", flush=True)
    if celery:
        stack = start_celery_stack(home, workers=args.workers, concurrency=args.concurrency, env=env,
                                   data_dir=Path(args.data).resolve() if args.data else None, port=args.port or None)
    else:
        stack = start_stack(home, env=env, port=args.port or None)
    try:
        print(f"Airflow UI:  {stack.url}   user {stack.username}   password {stack.password}")
        print(f"store:       {store}")
        if celery:
            print("\n".join(describe(stack)))
            print(f"Celery:      {len(stack.workers)} workers x {args.concurrency} task slots "
                  f"({', '.join(stack.worker_names)}: the hostname of each task they run)")
        else:
            for s in stack.services:
                print(f"  {s.name:22s} pid {s.pid}  log {s.log_path}")
        print("DAGs start paused: unpause them in the UI, then trigger synsetforge_vocabulary. Ctrl-C stops all.",
              flush=True)
        return run_until_interrupted(stack)
    finally:
        stack.stop()
        print("stopped.")
