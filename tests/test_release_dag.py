"""The release DAG runs build -> verify -> report with dag.test() on a real Airflow metadata DB."""

from __future__ import annotations

import pytest
from conftest import run_dag

pytestmark = pytest.mark.slow


def test_release_dag_builds_verifies_and_reports(airflow_db, tmp_path):
    from pipeline.release.manifest import list_releases, read_manifest
    from pipeline.release.synthetic import make_fixture
    from pipeline.store import open_store

    store = open_store(tmp_path / "store")
    make_fixture(store, n_classes=2, per_class=6, seed=9)
    conf = {"version": "2026.1", "store": str(tmp_path / "store"), "val_per_class": 2, "test_per_class": 1,
            "neardup_check": False}
    run = run_dag("synsetforge_release", conf)
    assert run.state == "success"
    assert list_releases(store) == ["2026.1"]
    m = read_manifest(store, "2026.1")
    assert m["split_policy"]["val_per_class"] == 2 and m["stats"]["neardup_checked"] is False
    assert store.exists("releases/2026.1/report.html") and store.exists("releases/2026.1/card.md")
    # a second run of the same version (a retry) succeeds without rewriting anything
    before = store.get("releases/2026.1/manifest.json")
    assert run_dag("synsetforge_release", conf).state == "success"
    assert store.get("releases/2026.1/manifest.json") == before
    # a different parent for an existing version fails the run
    failed = run_dag("synsetforge_release", {**conf, "parent": "other"})
    assert failed.state == "failed"
    assert {(ti.task_id, ti.state, ti.try_number) for ti in failed.get_task_instances()} >= {("build", "failed", 1)}


def test_release_dag_takes_fractional_quotas_and_force(airflow_db, tmp_path):
    from pipeline.release.manifest import list_releases, read_manifest
    from pipeline.release.synthetic import make_fixture
    from pipeline.store import open_store

    store = open_store(tmp_path / "store")
    make_fixture(store, n_classes=2, per_class=8, seed=3)
    conf = {"version": "f1", "store": str(tmp_path / "store"), "val_per_class": 0.25, "test_per_class": 0.25,
            "neardup_check": False}
    assert run_dag("synsetforge_release", conf).state == "success"
    assert read_manifest(store, "f1")["split_policy"]["val_per_class"] == 0.25
    # Quotas that leave no train image: refused on the first try, nothing published; --force builds it.
    tight = {**conf, "version": "f2", "val_per_class": 4, "test_per_class": 4}
    failed = run_dag("synsetforge_release", tight)
    assert failed.state == "failed" and "f2" not in list_releases(store)
    assert {(ti.task_id, ti.try_number) for ti in failed.get_task_instances() if ti.state == "failed"} == {("build", 1)}
    assert run_dag("synsetforge_release", {**tight, "force": True}).state == "success"
    assert "f2" in list_releases(store)
