"""The scale-out deployment files (infra/deploy/) parse and agree with the project, and the checker catches each
kind of breakage: every test below edits a copy of one file and expects the one problem it introduced."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "infra" / "deploy"

_spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


@pytest.fixture(scope="module")
def airflow_opts():
    opts = check.airflow_options()
    assert opts and "core" in opts, "Airflow's configuration description should be importable in the project venv"
    return opts


@pytest.fixture
def deploy_copy(tmp_path):
    dst = tmp_path / "infra" / "deploy"  # same depth as in the repository: build.context ../.. stays valid
    shutil.copytree(DEPLOY, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}: the test no longer matches the file"
    path.write_text(text.replace(old, new, 1))


def test_repository_deploy_files_pass(airflow_opts):
    assert check.check_deploy(airflow_opts=airflow_opts) == []


def test_files_parse_and_say_what_the_brief_asks():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("postgres", "redis", "airflow-init", "airflow-api-server", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "label-studio", "minio", "minio-init"):
        assert name in services
    assert services["airflow-worker"]["deploy"]["replicas"] >= 3
    # Label Studio in a database of its own on Airflow's PostgreSQL, as tests/test_airflow_celery.py runs it.
    assert services["label-studio"]["environment"]["POSTGRE_HOST"] == "postgres"
    assert services["label-studio"]["environment"]["POSTGRE_NAME"] == "labelstudio"
    assert check.initdb_databases(services["postgres"], DEPLOY) == {"labelstudio"}
    assert [n for n, s in services.items() if str(s.get("image", "")).startswith("postgres:")] == ["postgres"]
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    assert values["executor"] == "CeleryExecutor" and values["workers"]["replicas"] >= 2
    assert check.dockerfile_dags_target((DEPLOY / "Dockerfile").read_text()) == "/opt/airflow/dags"


def test_cli_exit_code(capsys):
    assert check.main(["--no-airflow"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")


def test_compose_variables_skip_escapes_and_read_defaults():
    assert check.compose_variables("x: $${HOSTNAME} ${A} ${B:-1} $C ${D:?say}") == {
        "A": None, "B": "1", "C": None, "D": None}


def test_env_example_missing_variable_is_caught(deploy_copy, airflow_opts):
    _edit(deploy_copy / ".env.example", "REDIS_PASSWORD=change-me\n", "")
    problems = check.check_deploy(deploy=deploy_copy, airflow_opts=airflow_opts)
    assert problems == ["docker-compose.yml: ${REDIS_PASSWORD} is not listed in .env.example"]


COMPOSE_BREAKAGES = [
    ('"127.0.0.1:8080:8080"', '"8080:8080"', "is not bound to 127.0.0.1"),
    ("minio/minio:RELEASE.2025-09-07T16-13-09Z", "minio/minio:latest", "is not pinned"),
    ("image: redis:7.0.15-bookworm", "image: redis", "has no tag"),
    ("SYNSETFORGE__CROWD__URL:", "SYNSETFORGE__CROWD__ADDRESS:", "has no field 'address'"),
    ("SYNSETFORGE__CROWD__URL:", "SYNSETFORGE__LABELS__URL:", "no settings section 'labels'"),
    ("AIRFLOW__CORE__EXECUTOR: CeleryExecutor", "AIRFLOW__CORE__EXECUTOR: LocalExecutor", "not CeleryExecutor"),
    ("      replicas: 3", "      replicas: 1", "Celery worker(s)"),
    ("heartexlabs/label-studio:1.23.2", "heartexlabs/label-studio:1.22.0", "pins label-studio==1.23.2"),
    ("image: synsetforge/airflow:3.3.2-0.1.0", "image: synsetforge/airflow:3.2.0-0.1.0", "pinned Airflow 3.3.2"),
    ("AIRFLOW__CORE__DAGS_FOLDER: /opt/airflow/dags", "AIRFLOW__CORE__DAGS_FOLDER: /srv/dags", "DAGS_FOLDER"),
    ("      - redis-data:/data", "      - redis-cache:/data", "'redis-cache' is not declared"),
    ("      - redis-data:/data", "      - ./no-such-dir:/data", "bind mount source './no-such-dir'"),
    ("    dockerfile: infra/deploy/Dockerfile", "    dockerfile: infra/deploy/Dockerfile.gone", "does not exist"),
    ('      test: ["CMD", "redis-cli", "ping"]', '      disable: true', "redis to be healthy but redis"),
    ("AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK:", "AIRFLOW__SCHEDULER__ENABLE_HEALTHCHECK:", "not an Airflow configuration"),
]


@pytest.mark.parametrize("old,new,expected", COMPOSE_BREAKAGES, ids=[b[2] for b in COMPOSE_BREAKAGES])
def test_compose_breakage_is_caught(deploy_copy, airflow_opts, old, new, expected):
    _edit(deploy_copy / "docker-compose.yml", old, new)
    problems = check.check_deploy(deploy=deploy_copy, airflow_opts=airflow_opts)
    assert any(expected in p for p in problems), problems


def test_long_running_service_without_healthcheck_is_caught(deploy_copy):
    path = deploy_copy / "docker-compose.yml"
    compose = yaml.safe_load(path.read_text())
    del compose["services"]["label-studio"]["healthcheck"]
    problems = check.compose_problems(
        compose, path.read_text(), check.env_file((deploy_copy / ".env.example").read_text()),
        compose_dir=deploy_copy, airflow_pin="3.3.2", labelstudio_pin="1.23.2", dags_target="/opt/airflow/dags")
    assert problems == ["docker-compose.yml service label-studio: long-running service without a healthcheck"]


def test_real_secret_in_env_example_is_caught(deploy_copy):
    _edit(deploy_copy / ".env.example", "MINIO_ROOT_PASSWORD=change-me", "MINIO_ROOT_PASSWORD=hunter2hunter2")
    problems = check.check_deploy(deploy=deploy_copy)
    assert problems == [".env.example: MINIO_ROOT_PASSWORD looks like a secret; its value must be the placeholder "
                        "'change-me'"]


DOCKERFILE_BREAKAGES = [
    ("COPY crowd /opt/synsetforge/crowd", "COPY crowds /opt/synsetforge/crowd", "source 'crowds' does not exist"),
    ("ARG AIRFLOW_VERSION=3.3.2", "ARG AIRFLOW_VERSION=3.2.0", "pins apache-airflow==3.3.2"),
    ("ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG PYTHON_IMAGE=python:latest", "is not pinned"),
    ("COPY dags /opt/airflow/dags", "COPY pipeline /opt/airflow/dags", "does not copy the project's dags/"),
]


@pytest.mark.parametrize("old,new,expected", DOCKERFILE_BREAKAGES, ids=[b[2] for b in DOCKERFILE_BREAKAGES])
def test_dockerfile_breakage_is_caught(deploy_copy, old, new, expected):
    _edit(deploy_copy / "Dockerfile", old, new)
    assert any(expected in p for p in check.check_deploy(deploy=deploy_copy))


def test_deploy_requirements_must_not_repin_the_lock(deploy_copy):
    (deploy_copy / "requirements-deploy.txt").write_text(
        (deploy_copy / "requirements-deploy.txt").read_text() + "SQLAlchemy==2.0.0\n")
    assert any("re-pins packages of requirements.txt: ['sqlalchemy']" in p for p in check.check_deploy(deploy=deploy_copy))


HELM_BREAKAGES = [
    ("  replicas: 3\n", "  replica: 3\n", "workers.replica is not a key"),
    ("  logGroomerSidecar:\n    enabled: false\n", "  logGroomer:\n    enabled: false\n", "is not a key"),
    ("executor: CeleryExecutor", "executor: KubernetesExecutor", "not CeleryExecutor"),
    ("  replicas: 3\n", "  replicas: 1\n", "workers.replicas is 1"),
    ('    tag: "3.3.2-0.1.0"', '    tag: "latest"', "images.airflow.repository/tag"),
    ('airflowVersion: "3.3.2"', 'airflowVersion: "3.1.3"', "airflowVersion"),
    ("    dags_folder: /opt/airflow/dags", "    dags_folder: /opt/airflow/dags-elsewhere", "config.core.dags_folder"),
    ("    load_examples:", "    load_example:", "config.core.load_example is not an Airflow"),
    ("  - name: SYNSETFORGE__INGEST__CONCURRENCY", "  - name: SYNSETFORGE__INGEST__THREADS", "no field 'threads'"),
    ("  - name: SYNSETFORGE__INGEST__CONCURRENCY\n    value: \"32\"",
     "  - name: SYNSETFORGE__CROWD__TOKEN\n    value: \"abc\"", "take it from a Kubernetes Secret"),
]


@pytest.mark.parametrize("old,new,expected", HELM_BREAKAGES, ids=[b[2] for b in HELM_BREAKAGES])
def test_helm_breakage_is_caught(deploy_copy, airflow_opts, old, new, expected):
    _edit(deploy_copy / "helm" / "values.yaml", old, new)
    assert any(expected in p for p in check.check_deploy(deploy=deploy_copy, airflow_opts=airflow_opts))


def test_helm_values_checked_against_a_given_chart():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    assert check.unknown_chart_keys(values, check.CHART_KEYS) == []
    older_chart = {**check.CHART_KEYS, "dagProcessor": {"enabled": None, "replicas": None}}
    older_chart.pop("apiServer")
    assert check.unknown_chart_keys(values, older_chart) == ["dagProcessor.logGroomerSidecar", "apiServer"]


# The settings the tests' CeleryExecutor stack runs with (pipeline/celery_stack.py, tests/test_airflow_celery.py):
# check.py holds the compose file and the Helm values to them.
PROVEN_COMPOSE_BREAKAGES = [
    ("RESULT_BACKEND: db+postgresql+psycopg2://", "RESULT_BACKEND: db+postgresql://", "is not shaped like the tested"),
    ("@postgres:5432/airflow\n    AIRFLOW__CELERY__BROKER_URL", "@postgres:5432/results\n    AIRFLOW__CELERY__BROKER_URL",
     "the result backend must be the metadata database"),
    ("SQL_ALCHEMY_CONN: postgresql+psycopg2://", "SQL_ALCHEMY_CONN: postgresql://", "is not shaped like the tested"),
    ("@redis:6379/0", "@redis:6379/1", "is not shaped like the tested"),
    ("redis://:${REDIS_PASSWORD}@redis", "redis://:${AIRFLOW_DB_PASSWORD}@redis", "requires (--requirepass)"),
    ("@postgres:5432/airflow\n    AIRFLOW__CELERY__BROKER_URL", "@results-db:5432/airflow\n    AIRFLOW__CELERY__BROKER_URL",
     "the result backend must be the metadata database"),
    ("    AIRFLOW__API_AUTH__JWT_SECRET: ${AIRFLOW_JWT_SECRET}\n", "", "AIRFLOW__API_AUTH__JWT_SECRET is not set"),
    ("AIRFLOW__CELERY__WORKER_CONCURRENCY: ${AIRFLOW_WORKER_CONCURRENCY}\n", "",
     "AIRFLOW__CELERY__WORKER_CONCURRENCY is not set"),
    ('command: ["airflow", "celery", "worker"]', 'command: ["airflow", "celery", "worker", "--queues", "other"]',
     "is not the tested 'airflow celery worker'"),
    ("      DJANGO_DB: default", "      DJANGO_DB: sqlite", "DJANGO_DB='sqlite'"),
    ("      POSTGRE_PORT: \"5432\"\n", "", "POSTGRE_PORT is not set"),
    # Label Studio on Airflow's PostgreSQL service, in a database of its own created at init, as tested.
    ("      POSTGRE_HOST: postgres", "      POSTGRE_HOST: redis", "is not Airflow's PostgreSQL service 'postgres'"),
    ("      POSTGRE_PORT: \"5432\"", "      POSTGRE_PORT: \"5433\"", "is not the port Airflow uses on postgres"),
    ("      POSTGRE_NAME: labelstudio", "      POSTGRE_NAME: airflow", "is Airflow's database"),
    ("      POSTGRE_NAME: labelstudio", "      POSTGRE_NAME: crowd", "creates database 'crowd'"),
    ("      - ./postgres-init:/docker-entrypoint-initdb.d:ro\n", "", "creates database 'labelstudio'"),
    ("      POSTGRE_USER: airflow", "      POSTGRE_USER: labelstudio", "but postgres has POSTGRES_USER='airflow'"),
    # The servers are the versions the tests' stack ran (pipeline/celery_stack.py TESTED_VERSIONS).
    ("image: postgres:15.10-bookworm", "image: postgres:16.10-bookworm", "is not PostgreSQL 15"),
    ("image: redis:7.0.15-bookworm", "image: redis:7.2.10-bookworm", "is not Redis 7.0"),
    ("image: redis:7.0.15-bookworm", "image: redis:7-bookworm", "is not Redis 7.0"),
]


@pytest.mark.parametrize("old,new,expected", PROVEN_COMPOSE_BREAKAGES, ids=[b[2] for b in PROVEN_COMPOSE_BREAKAGES])
def test_compose_must_say_what_the_celery_stack_proved(deploy_copy, old, new, expected):
    _edit(deploy_copy / "docker-compose.yml", old, new)
    problems = check.check_deploy(deploy=deploy_copy)
    assert any(expected in p for p in problems), problems


PROVEN_HELM_BREAKAGES = [
    ("    protocol: postgresql+psycopg2", "    protocol: postgresql", "not the tested 'postgresql+psycopg2'"),
    ("  resultBackendConnection: null", "  resultBackendConnection: {protocol: postgresql+psycopg2, db: results}",
     "differs from the metadata database"),
    ('  args: ["bash", "-c", "exec airflow celery worker"]', '  args: ["bash", "-c", "exec airflow celery worker -q x"]',
     "is not the tested 'airflow celery worker'"),
    ('  args: ["bash", "-c", "exec airflow celery worker"]\n', "", "workers.args is not set"),
    ("    worker_concurrency: 8\n", "    pool: prefork\n", "config.celery.worker_concurrency is not set"),
    ('    tag: "15.4.0-debian-11-r45"', '    tag: "16.1.0-debian-11-r15"', "postgresql.image: tag '16.1.0-debian-11-r15' is not"),
    ('    tag: "7.0.15-bookworm"', '    tag: "7.2-bookworm"', "images.redis: tag '7.2-bookworm' is not Redis 7.0"),
    ('    tag: "7.0.15-bookworm"\n', "", "images.redis.tag is not set"),
]


@pytest.mark.parametrize("old,new,expected", PROVEN_HELM_BREAKAGES, ids=[b[2] for b in PROVEN_HELM_BREAKAGES])
def test_helm_values_must_say_what_the_celery_stack_proved(deploy_copy, old, new, expected):
    _edit(deploy_copy / "helm" / "values.yaml", old, new)
    problems = check.check_deploy(deploy=deploy_copy)
    assert any(expected in p for p in problems), problems


def test_deploy_images_are_the_server_versions_the_test_stack_ran():
    """Every PostgreSQL / Redis image of the compose file and the chart's bundled ones have the tested PostgreSQL
    major and Redis major.minor (TESTED_VERSIONS, which tests/test_airflow_celery.py asserts the running servers
    report); a different major fails the check."""
    from pipeline.celery_stack import TESTED_VERSIONS

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    servers = {name: (check._server_of(s["image"]), check._tag(s["image"])) for name, s in compose["services"].items()
               if check._server_of(s.get("image", ""))}
    assert {s for s, _ in servers.values()} == {"postgres", "redis"}, servers
    for name, (server, tag) in servers.items():
        major = tag.split("-")[0].split(".")[:len(TESTED_VERSIONS[server].split("."))]
        assert ".".join(major) == TESTED_VERSIONS[server], f"service {name}: {tag} is not {TESTED_VERSIONS[server]}"
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    assert values["postgresql"]["image"]["tag"].split(".")[0] == TESTED_VERSIONS["postgres"]
    assert values["images"]["redis"]["tag"].startswith(TESTED_VERSIONS["redis"] + ".")
    assert check.tag_version_problems("x", "postgres", "16.10-bookworm") and check.tag_version_problems(
        "x", "redis", "7.2.10")
    assert check.tag_version_problems("x", "postgres", "15.10-bookworm") == []


def test_the_proven_settings_are_the_ones_the_test_stack_runs_with():
    """check.py's patterns come from celery_settings itself: the stack's own values match them, part by part."""
    from pipeline.celery_stack import celery_settings

    env = celery_settings(db_user="u", db_password="pw", db_host="127.0.0.1", db_port=5432, db_name="airflow",
                          redis_password="rp", redis_host="127.0.0.1", redis_port=6379, concurrency=2)
    patterns = check._proven_patterns()
    assert set(patterns) == set(env)
    assert patterns["AIRFLOW__CELERY__RESULT_BACKEND"].fullmatch(env["AIRFLOW__CELERY__RESULT_BACKEND"])[
        "db_name"] == "airflow"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    worker_env = check._environment(compose["services"]["airflow-worker"])
    assert {k: patterns[k].fullmatch(worker_env[k]) is not None for k in env} == dict.fromkeys(env, True)
