"""Every DAG file imports cleanly, and the vocabulary DAG runs with dag.test() on a real SQLite metadata DB."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_dag

pytestmark = pytest.mark.slow


def test_every_dag_file_imports(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    files = {Path(p).name for p in ROOT.joinpath("dags").glob("*.py")}
    assert {Path(d.fileloc).name for d in bag.dags.values()} == files
    assert "synsetforge_vocabulary" in bag.dag_ids


def test_vocabulary_dag_run_writes_synsets(airflow_db, tmp_path):
    from pipeline.store import open_store

    store_dir = tmp_path / "store"
    run = run_dag("synsetforge_vocabulary", {"roots": ["n02084071"], "max_depth": 1, "store": str(store_dir)})
    assert run.state == "success"
    table = open_store(store_dir).read_table("synsets")
    assert table.column("wnid").to_pylist()[0] == "n02084071"
    assert table.num_rows > 5


def test_vocabulary_dag_run_fails_on_bad_wnid_file(airflow_db, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("n00000001\n")
    run = run_dag("synsetforge_vocabulary", {"wnid_file": str(bad), "store": str(tmp_path / "s")})
    assert run.state == "failed"
