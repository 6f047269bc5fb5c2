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
    [ti] = run.get_task_instances()
    assert (ti.state, ti.try_number) == ("failed", 1)  # an input mistake is not retried


def test_dags_form_one_asset_chain_with_retries_and_light_imports(airflow_db):
    """vocabulary -> collect -> crowd -> boxes by Assets (each scheduled on an Asset another DAG's task
    produces), release by hand; every task retried; parsing a DAG file imports none of the heavy stage code."""
    import subprocess
    import sys

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    outlets = {d.dag_id: {o.uri for t in d.tasks for o in t.outlets} for d in bag.dags.values()}

    def uris_of(condition):  # an Asset, or AssetAll / AssetAny of them
        if condition is None:
            return set()
        return {condition.uri} if hasattr(condition, "uri") else set().union(*map(uris_of, condition.objects))

    def upstream(dag_id):
        uris = uris_of(bag.get_dag(dag_id).timetable.asset_condition)
        return {other for other, produced in outlets.items() if uris & produced}, uris

    chain = {"synsetforge_collect": "synsetforge_vocabulary", "synsetforge_crowd": "synsetforge_collect",
             "synsetforge_boxes": "synsetforge_crowd"}
    for dag_id, parent in chain.items():
        producers, uris = upstream(dag_id)
        assert uris and producers == {parent}, (dag_id, uris, producers)
    assert upstream("synsetforge_vocabulary")[1] == set() and upstream("synsetforge_release")[1] == set()
    assert type(bag.get_dag("synsetforge_release").timetable).__name__ == "NullTimetable"  # by hand only
    for dag in bag.dags.values():
        for t in dag.tasks:
            assert t.retries >= 2 and t.retry_exponential_backoff, (dag.dag_id, t.task_id)
    assert bag.get_dag("synsetforge_collect").get_task("ingest_shard").retries >= 4

    probe = ("import runpy, sys, glob\n"
             "[runpy.run_path(f) for f in sorted(glob.glob(sys.argv[1] + '/*.py'))]\n"
             "print(sorted(m for m in ('pandas', 'nltk', 'PIL', 'label_studio_sdk', 'boto3', 'crowdkit', 'sklearn')"
             " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(ROOT / "dags")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _crowd_task(task_id: str):
    """The Python function behind one task of the crowd DAG (its @fail_fast wrapper included), called directly:
    no scheduler, no Label Studio."""
    import runpy

    dag = runpy.run_path(str(ROOT / "dags" / "crowd.py"))["synsetforge_crowd"]()
    return dag.get_task(task_id).python_callable


def _no_server(*args, **kwargs):
    raise AssertionError("block_workers reached Label Studio with crowd.auto_block off")


def test_crowd_dag_blocks_no_one_when_auto_block_is_off(monkeypatch, tmp_path):
    """block_workers with crowd.auto_block off (the default, or the `auto_block` Param set to false over a
    configuration that has it on) returns at once: no client is made, block_flagged is never called. On, it is."""
    import crowd.cli
    import crowd.status

    for name in ("AUTO_BLOCK", "URL", "TOKEN"):
        monkeypatch.delenv(f"SYNSETFORGE__CROWD__{name}", raising=False)
    monkeypatch.setattr(crowd.cli, "admin_client", _no_server)
    monkeypatch.setattr(crowd.status, "block_flagged", _no_server)
    block_workers = _crowd_task("block_workers")
    params = {"store": str(tmp_path / "store"), "auto_block": None, "kind": "verify"}
    off = {"auto_block": False, "blocked": []}
    assert block_workers({}, params=params) == off  # configuration default: off
    monkeypatch.setenv("SYNSETFORGE__CROWD__AUTO_BLOCK", "true")
    assert block_workers({}, params={**params, "auto_block": False}) == off  # the Param turns it off for this run

    calls = []
    monkeypatch.setattr(crowd.cli, "admin_client", lambda settings: "client")
    monkeypatch.setattr(crowd.status, "block_flagged",
                        lambda store, client, settings: calls.append((client, settings.crowd.auto_block)) or {"blocked": []})
    assert block_workers({}, params=params) == {"blocked": []}  # on by the configuration
    monkeypatch.delenv("SYNSETFORGE__CROWD__AUTO_BLOCK")
    assert block_workers({}, params={**params, "auto_block": True}) == {"blocked": []}  # on by the Param
    assert calls == [("client", True), ("client", True)]


def test_crowd_dag_qc_method_param_reaches_run_qc(monkeypatch, tmp_path):
    """The crowd DAG's aggregate task, run on a store with votes: the `qc_method` Param decides how the votes
    become labels (recorded in labels.method), and left empty the configured qc.method does."""
    from datetime import UTC, datetime

    import numpy as np
    import pandas as pd

    from pipeline.store import LocalStore

    monkeypatch.delenv("SYNSETFORGE__QC__METHOD", raising=False)
    rng = np.random.default_rng(3)
    rows = [(t, w, ("yes" if t % 2 else "no") if rng.random() < 0.85 else ("no" if t % 2 else "yes"))
            for t in range(24) for w in range(5)]
    votes = pd.DataFrame({"annotation_id": np.arange(1, len(rows) + 1), "task_id": [t for t, _, _ in rows],
                          "image_id": [f"{t:064x}" for t, _, _ in rows], "wnid": "n02084071",
                          "worker": [f"w{w}" for _, w, _ in rows], "answer": [a for _, _, a in rows], "is_gold": False,
                          "lead_time_s": 1.0, "submitted_at": datetime(2026, 1, 1, tzinfo=UTC)})
    aggregate = _crowd_task("aggregate")

    def method_of_run(param, root):
        store = LocalStore(root)
        store.write_table("votes", votes)
        summary = aggregate({}, params={"store": str(root), "qc_method": param, "kind": "verify"})
        methods = {m.split("/")[0] for m in store.read_table("labels").column("method").to_pylist()}
        return summary["method"], methods

    assert method_of_run("mv", tmp_path / "mv") == ("mv", {"mv"})
    assert method_of_run("confidence-table", tmp_path / "ct") == ("confidence-table", {"confidence-table"})
    assert method_of_run(None, tmp_path / "default") == ("adaptive-ds", {"adaptive-ds"})  # qc.method's default
    monkeypatch.setenv("SYNSETFORGE__QC__METHOD", "ds")
    assert method_of_run(None, tmp_path / "configured") == ("ds", {"ds"})
