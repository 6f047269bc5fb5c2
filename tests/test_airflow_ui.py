"""What a data engineer sees: the Airflow 3 UI (api-server) in headless Chromium lists the DAGs, offers the
trigger form with our Params and shows a finished vocabulary run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_dag, wait_for_text

from pipeline.services import free_port, start_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_ui(airflow_db, artifacts_dir):
    airflow = str(Path(sys.executable).with_name("airflow"))
    env = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}  # local test server: no login page
    subprocess.run([airflow, "dags", "reserialize"], check=True, capture_output=True, env={**os.environ, **env})
    port = free_port()
    service = start_service(
        "airflow-api-server", [airflow, "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
        url=f"http://127.0.0.1:{port}", ready_path="/api/v2/monitor/health", env=env,
        log_path=artifacts_dir / "airflow-api-server.log", timeout=180,
    )
    yield service.url
    service.stop()
    assert service.process.poll() is not None


def test_airflow_ui_shows_dags_params_and_a_successful_run(airflow_ui, browser, tmp_path, artifacts_dir):
    run = run_dag("synsetforge_vocabulary", {"roots": ["n02121808"], "max_depth": 1, "store": str(tmp_path / "s")})
    assert run.state == "success"

    browser.get(f"{airflow_ui}/dags")
    body = wait_for_text(browser, "synsetforge_vocabulary")
    for dag_file in ROOT.joinpath("dags").glob("*.py"):
        assert f"synsetforge_{dag_file.stem}" in body, f"DAG from {dag_file.name} missing in the UI"
    browser.save_screenshot(str(artifacts_dir / "airflow-dags.png"))

    browser.get(f"{airflow_ui}/dags/synsetforge_vocabulary/runs")
    body = wait_for_text(browser, run.run_id)
    assert "Success" in body
    browser.save_screenshot(str(artifacts_dir / "airflow-vocabulary-runs.png"))

    browser.get(f"{airflow_ui}/dags/synsetforge_vocabulary")
    wait_for_text(browser, "Trigger")
    [button] = [b for b in browser.find_elements("tag name", "button") if b.text.strip() == "Trigger"][:1]
    button.click()
    form = wait_for_text(browser, "Run Parameters")
    for param, help_text in (("roots", "root wnids or synset names"), ("max_depth", "levels below each root"),
                             ("wnid_file", "one wnid per line"), ("store", "store URL")):
        assert param in form and help_text in form
    browser.save_screenshot(str(artifacts_dir / "airflow-trigger-form.png"))
