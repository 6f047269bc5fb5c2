"""Shared fixtures. Airflow's environment is set here, before any test module can import airflow."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from pipeline.airflow_local import airflow_env, migrate  # imports no airflow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# Never a developer's real Airflow: a temp home, our DAGs, no examples, parallelism 2.
os.environ.update(airflow_env(tempfile.mkdtemp(prefix="sf-airflow-")))
# Credentials for boto3 against moto; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from pipeline.services import start_moto  # noqa: E402
from pipeline.store import LocalStore, S3Store  # noqa: E402


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """test-artifacts/ (untracked): logs and screenshots; docs/ under it holds the README's pictures, which
    `make screenshots` copies into the tracked docs/ (tests never write tracked files)."""
    (ARTIFACTS / "docs").mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def moto_server(artifacts_dir):
    """A real moto S3 server on 127.0.0.1, stopped by PID at the end of the session."""
    service = start_moto(artifacts_dir)
    yield service.url
    service.stop()
    assert service.process.poll() is not None


@pytest.fixture
def s3_bucket(moto_server):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server)
    bucket = f"sf-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same test cases run on both backends."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    client, bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "root", client=client)


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate a fresh SQLite metadata DB under the temp AIRFLOW_HOME once per session."""
    migrate(dict(os.environ))
    return os.environ["AIRFLOW_HOME"]


def run_dag(dag_id: str, conf: dict | None = None):
    """Run a DAG from dags/ with dag.test() and return the DagRun (callers assert its state). Retries happen
    at once instead of after their backoff, so a test of a failing task does not wait minutes."""
    from datetime import timedelta

    from pipeline.airflow_local import run_dag_test

    return run_dag_test(dag_id, conf, retry_delay=timedelta(0))


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def make_browser(width: int = 1400, height: int = 1000, profile_dir: str | None = None):
    """Headless Debian Chromium driven by Selenium. Nothing is downloaded: the binaries come from apt."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian chromium / chromium-driver missing: run `make setup` (infra/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--window-size={width},{height}",
                 f"--user-data-dir={profile_dir or tempfile.mkdtemp(prefix='sf-chrome-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    return driver


@pytest.fixture
def browser():
    """A fresh headless Chromium per test; quit, and its profile removed, at the end."""
    profile = tempfile.mkdtemp(prefix="sf-chrome-")
    driver = make_browser(profile_dir=profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(fn, timeout: float = 120.0, what: str = "condition"):
    """Poll fn() until it returns something truthy (pages render asynchronously); fail saying what never came."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the page is still rendering
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def wait_for_text(driver, *texts: str, timeout: float = 60.0) -> str:
    """The page's text once it contains every one of `texts` (pages render asynchronously)."""
    def body():
        page = driver.find_element("tag name", "body").text
        return page if all(t in page for t in texts) else None

    return wait_until(body, timeout, f"{texts} on the page")


@pytest.fixture(scope="session")
def labelstudio(artifacts_dir):
    """One real Label Studio 1.23.2 per test session (SF_LABELSTUDIO_URL reuses a running one); stopped by PID."""
    from fixtures_labelstudio import start_session_labelstudio

    yield from start_session_labelstudio(artifacts_dir)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if more than one session Label Studio was started (see fixtures_labelstudio.SESSION_SERVERS)."""
    import sys

    servers = getattr(sys.modules.get("fixtures_labelstudio"), "SESSION_SERVERS", [])
    if len(servers) > 1:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"{len(servers)} session Label Studio servers were started, for {', '.join(servers)}: a module "
                   "imports the `labelstudio` fixture or starts its own through start_session_labelstudio; "
                   "conftest.py's fixture is the one a session shares")
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(f"ERROR: {message}", red=True)
        else:
            print(f"ERROR: {message}", file=sys.stderr)
