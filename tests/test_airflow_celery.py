"""The DAGs on Airflow's CeleryExecutor, started by the test: PostgreSQL 15 (initdb in a temp folder) as the metadata
database and Celery result backend, Redis as the broker, api-server, scheduler, dag-processor and two Celery
workers (`pipeline.celery_stack`), the store on the moto S3 server. Every process is on 127.0.0.1 and stopped by
PID.

The vocabulary DAG is triggered through the REST API; its Asset starts collect over 16 synset shards. Both workers
run tasks. The first ingest part written makes its task hang (failpoint `hang`); the test then kills that task's
whole worker (Celery main process, pool and task runner: what a machine that dies does), the scheduler fails the
task when its heartbeat stops, and the retry runs on the other worker. The tables equal a serial dag.test() run's.
Then the crowd loop's DAG runs on the same stack against a Label Studio whose database is that PostgreSQL: its
tasks and the simulated annotators' answers are rows there, and the DAG's tables agree with them."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import boto3
import pytest
from conftest import run_dag, wait_until
from test_airflow_scheduler import WNIDS, api, make_corpus, table_rows, wait_for_run

from pipeline.celery_stack import TESTED_VERSIONS, start_celery_stack
from pipeline.services import descendants, kill_tree
from pipeline.store import open_store

pytestmark = pytest.mark.slow
BUCKET = "sf-celery"


@pytest.fixture(scope="module")
def world(artifacts_dir, moto_server):
    tmp = Path(tempfile.mkdtemp(prefix="sf-celery-"))
    tmp.chmod(0o711)  # PostgreSQL runs as the unprivileged postgres user under root: it must reach its data folder
    make_corpus(tmp / "photos")
    (tmp / "classes.txt").write_text("\n".join(WNIDS) + "\n")
    (tmp / "faults").mkdir()
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=BUCKET)
    env = {  # what asset-triggered runs read: they get no Params from the run that triggered them
        "SYNSETFORGE__STORE__URL": f"s3://{BUCKET}/parallel",
        "SYNSETFORGE__STORE__S3_ENDPOINT_URL": moto_server,
        "SYNSETFORGE__COLLECT__SOURCES": '["local_dir"]',
        "SYNSETFORGE__COLLECT__LOCAL_DIR": str(tmp / "photos"),
        "SYNSETFORGE__COLLECT__SHARD_SIZE": "1",
        "SYNSETFORGE__INGEST__FLUSH_EVERY": "2",
        "SYNSETFORGE_FAILPOINTS": "ingest.part_written=hang",  # the first part written: its task waits to be killed
        "SYNSETFORGE_FAILPOINT_DIR": str(tmp / "faults"),
        # Secrets reach tasks only from the environment: the token Label Studio will be started with (crowd test).
        # No crowd.url: scheduled and asset-triggered crowd runs skip; the test's own runs pass it as a Param.
        "SYNSETFORGE__CROWD__TOKEN": secrets.token_hex(20),
        "SYNSETFORGE__CROWD__PSEUDONYM_KEY": "celery-test-pseudonym-key",
    }
    stack = start_celery_stack(tmp / "airflow", env=env, log_dir=artifacts_dir / "airflow-celery", fsync=False,
                               heartbeat_timeout=30)
    state = {"tmp": tmp, "stack": stack, "url": stack.url, "token": stack.token(), "moto": moto_server}
    try:
        yield state
    finally:
        if state.get("labelstudio"):
            state["labelstudio"].stop()
        stack.stop()
        assert all(s.process.poll() is not None for s in stack.services)
        shutil.rmtree(tmp, ignore_errors=True)


def tries_of(url: str, token: str, run_id: str, task_id: str, map_index: int) -> list[dict]:
    return api(f"{url}/api/v2/dags/synsetforge_collect/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries",
               token=token)["task_instances"]


def task_instances(url: str, token: str, dag_id: str, run_id: str) -> list[dict]:
    return api(f"{url}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100", token=token)["task_instances"]


# pytest-timeout counts the module fixture's set-up too: starting the stack may wait up to 120 + 30 + 240 + 2 x 240 s
# (PostgreSQL, Redis, api-server, each worker's "ready."), and this test's own waits add up to 240 + 900 + 30 + 60 +
# 1200 s, 3,300 s in all (plus the serial dag.test() run), well past pyproject's 900 s per test.
@pytest.mark.timeout(3900)
def test_collect_on_two_celery_workers_survives_a_killed_worker_and_matches_a_serial_run(world, airflow_db,
                                                                                        monkeypatch):
    import redis

    url, tmp, token, stack = world["url"], world["tmp"], world["token"], world["stack"]
    assert api(f"{url}/api/v2/monitor/health")["metadatabase"]["status"] == "healthy"
    assert stack.postgres.query("airflow", "SELECT count(*) FROM alembic_version")[0][0] == 1  # migrated into PG
    # The servers are the versions infra/deploy pins (check.py holds the deploy files to TESTED_VERSIONS).
    pg_version = int(stack.postgres.query("airflow", "SHOW server_version_num")[0][0])
    redis_version = redis.Redis(host=stack.redis.host, port=stack.redis.port, password=stack.redis.password,
                                socket_timeout=10).info("server")["redis_version"]
    assert {"postgres": str(pg_version // 10000), "redis": ".".join(redis_version.split(".")[:2])} == \
        TESTED_VERSIONS, (pg_version, redis_version)
    wait_until(lambda: {d["dag_id"] for d in api(f"{url}/api/v2/dags", token=token)["dags"]} >= {
        "synsetforge_vocabulary", "synsetforge_collect", "synsetforge_crowd"} or None, timeout=240,
        what="the DAGs parsed")
    for dag_id in ("synsetforge_vocabulary", "synsetforge_collect"):
        assert api(f"{url}/api/v2/dags/{dag_id}", "PATCH", {"is_paused": False}, token)["is_paused"] is False

    store_url = f"s3://{BUCKET}/parallel"
    triggered = api(f"{url}/api/v2/dags/synsetforge_vocabulary/dagRuns", "POST",
                    {"logical_date": None, "conf": {"wnid_file": str(tmp / "classes.txt"), "store": store_url}},
                    token)
    assert triggered["state"] == "queued"

    # The first ingest part is written: that task now hangs in the failpoint. Find its worker by the PID it wrote.
    marker = tmp / "faults" / "ingest.part_written.0"
    wait_until(lambda: marker.exists() and marker.read_text(), timeout=900, what="the first ingest part")
    task_pid = int(marker.read_text())
    holders = [name for name, w in zip(stack.worker_names, stack.workers, strict=True)
               if task_pid in descendants(w.pid)]
    assert len(holders) == 1, f"task process {task_pid} under no worker or several: {holders}"
    victim_name = holders[0]
    (survivor_name,) = [n for n in stack.worker_names if n != victim_name]
    victim = stack.worker(victim_name)
    killed = kill_tree(victim.process)  # the worker, its pool and the task runner it forked, all at once
    assert task_pid in killed and victim.process.poll() is not None
    wait_until(lambda: not Path(f"/proc/{task_pid}").exists() or "zombie" in Path(
        f"/proc/{task_pid}/status").read_text().lower() or None, timeout=30, what="the hung task process gone")

    vocab = wait_for_run(url, "synsetforge_vocabulary", token, 60)
    assert vocab["state"] == "success", vocab
    collect = wait_for_run(url, "synsetforge_collect", token, 1200, run_type="asset_triggered")
    assert collect["state"] == "success", collect
    assert stack.worker(survivor_name).process.poll() is None, "the surviving worker must still be running"

    tis = task_instances(url, token, "synsetforge_collect", collect["dag_run_id"])
    by_task: dict[str, list[dict]] = {}
    for ti in tis:
        by_task.setdefault(ti["task_id"], []).append(ti)
    assert len(by_task["collect_shard"]) == 16 and len(by_task["ingest_shard"]) == 16
    assert all(ti["state"] == "success" for group in by_task.values() for ti in group)
    retried = [ti for ti in by_task["ingest_shard"] if ti["try_number"] > 1]
    assert len(retried) == 1, "exactly one ingest task lost its worker and was retried"
    tries = sorted(tries_of(url, token, collect["dag_run_id"], "ingest_shard", retried[0]["map_index"]),
                   key=lambda t: t["try_number"])
    assert [(t["try_number"], t["hostname"]) for t in tries][:1] == [(1, victim_name)]
    assert tries[-1]["hostname"] == survivor_name and tries[-1]["state"] == "success"
    assert tries[0]["state"] == "failed"  # failed by the scheduler when the dead worker's heartbeat stopped

    # Both workers ran collect tasks to success (the survivor also every task after the kill).
    ran = {ti["hostname"] for ti in tis if ti["state"] == "success"}
    assert ran == {victim_name, survivor_name}, ran
    assert sorted(p.name for p in (tmp / "faults").iterdir()) == ["ingest.part_written.0"]
    # Celery's results went to the PostgreSQL result backend.
    assert stack.postgres.query("airflow", "SELECT count(*) FROM celery_taskmeta")[0][0] >= 2 * 16

    parallel = open_store(store_url, endpoint_url=world["moto"])
    assert parallel.list("ingest/parts/") == [] and parallel.list("collect/parts/") == []
    images = parallel.read_table("images").to_pandas()
    links = parallel.read_table("image_links").to_pandas()
    assert not images.duplicated("first_url").any() and not links.duplicated(["image_id", "wnid"]).any()
    assert (images.status == "accepted").sum() == 16 * 4 + 1  # + the re-compressed copy; the exact copy is one image
    assert images.loc[images.status == "rejected", "reject_reason"].tolist() == ["not_an_image"]

    monkeypatch.setenv("SYNSETFORGE__STORE__S3_ENDPOINT_URL", world["moto"])
    serial_url = f"s3://{BUCKET}/serial"
    serial = open_store(serial_url, endpoint_url=world["moto"])
    serial.write_table("synsets", parallel.read_table("synsets"))
    conf = {"sources": ["local_dir"], "local_dir": str(tmp / "photos"), "shard_size": 1, "store": serial_url}
    assert run_dag("synsetforge_collect", conf).state == "success"  # dag.test(): one task at a time, no faults
    for name in ("candidates", "images", "image_links"):
        assert table_rows(parallel, name) == table_rows(serial, name), f"{name} differs from the serial run"
    world["collected"] = True


@pytest.fixture(scope="module")
def labelstudio_on_postgres(world, artifacts_dir):
    """Label Studio 1.23.2 whose database is a database of the stack's PostgreSQL."""
    from crowd.server import start_labelstudio

    pg = world["stack"].postgres
    pg.create_database("labelstudio")
    server = start_labelstudio(world["tmp"] / "label-studio", database_url=pg.url("labelstudio"),
                               token=world["stack"].env["SYNSETFORGE__CROWD__TOKEN"],
                               log_path=artifacts_dir / "airflow-celery" / "label-studio.log",
                               timeout=float(os.environ.get("SF_LS_TIMEOUT", "300")))
    world["labelstudio"] = server
    return server


# Label Studio's start (SF_LS_TIMEOUT, default 300 s) and two crowd runs of up to 900 s each: 2,100 s of waits.
@pytest.mark.timeout(2400)
def test_crowd_loop_runs_on_the_celery_stack_against_label_studio_on_postgresql(world, labelstudio_on_postgres):
    from crowd.client import CrowdClient
    from crowd.provision import find_project
    from crowd.simulate import Profile, make_annotators, work

    if not world.get("collected"):  # the crowd DAG reads the images and links that collect run wrote
        pytest.fail("the collect test of this module did not finish, so there are no collected images to crowd: "
                    "run test_collect_on_two_celery_workers_survives_a_killed_worker_and_matches_a_serial_run first "
                    "(see its own failure)")
    url, token, stack, ls = world["url"], world["token"], world["stack"], labelstudio_on_postgres
    pg = stack.postgres
    # Label Studio's own tables are in that PostgreSQL, not in a SQLite file of its data folder.
    assert pg.query("labelstudio", "SELECT count(*) FROM django_migrations")[0][0] > 100
    assert not list(Path(ls.data_dir).rglob("*.sqlite3"))

    store_url, prefix = f"s3://{BUCKET}/parallel", "celery"
    conf = {"store": store_url, "url": ls.url, "project_prefix": prefix}
    assert api(f"{url}/api/v2/dags/synsetforge_crowd", "PATCH", {"is_paused": False}, token)["is_paused"] is False

    def crowd_run() -> dict:
        run = api(f"{url}/api/v2/dags/synsetforge_crowd/dagRuns", "POST", {"logical_date": None, "conf": conf}, token)
        return wait_until(lambda: (r := api(f"{url}/api/v2/dags/synsetforge_crowd/dagRuns/{run['dag_run_id']}",
                                            token=token))["state"] in ("success", "failed") and r,
                          timeout=900, what="the crowd run")

    first = crowd_run()
    assert first["state"] == "success", task_instances(url, token, "synsetforge_crowd", first["dag_run_id"])
    store = open_store(store_url, endpoint_url=world["moto"])
    tasks = store.read_table("tasks").to_pandas()
    assert len(tasks) > 0
    admin = CrowdClient(ls.url, ls.token)
    pid = find_project(admin, f"{prefix} verify")["id"]
    assert pg.query("labelstudio", "SELECT count(*) FROM task WHERE project_id = %s", (pid,))[0][0] == len(tasks)

    images = store.read_table("images").to_pandas()
    links = store.read_table("image_links").to_pandas()
    accepted = set(images.loc[images.status == "accepted", "image_id"])
    truth = {(i, w): "yes" for i, w in zip(links.image_id, links.wnid, strict=True) if i in accepted}
    done = work(make_annotators(admin, [Profile(accuracy=1.0)], prefix="celery"), pid, truth, seed=1)
    answered = sum(done.values())
    assert answered > 0
    assert pg.query("labelstudio", "SELECT count(*) FROM task_completion WHERE project_id = %s",
                    (pid,))[0][0] == answered

    second = crowd_run()
    assert second["state"] == "success", task_instances(url, token, "synsetforge_crowd", second["dag_run_id"])
    votes = store.read_table("votes").to_pandas()
    assert len(votes) == answered and votes["annotation_id"].is_unique
    assert set(votes["answer"]) == {"yes"}
    ran_on = {ti["hostname"] for r in (first, second)
              for ti in task_instances(url, token, "synsetforge_crowd", r["dag_run_id"]) if ti["state"] == "success"}
    assert ran_on and ran_on <= set(stack.worker_names), ran_on


def test_synsetforge_airflow_up_celery_starts_postgres_redis_two_workers_and_stops_them_on_ctrl_c():
    import re
    import signal
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp(prefix="sf-celery-up-"))
    tmp.chmod(0o711)
    cmd = [str(Path(sys.executable).with_name("synsetforge")), "--store", str(tmp / "store"), "airflow", "up",
           "--executor", "celery", "--home", str(tmp / "home"), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    pids: list[int] = []
    try:
        while not any("Ctrl-C stops all" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "synsetforge airflow up --executor celery exited early:\n" + "".join(lines)
            lines.append(line)
        out = "".join(lines)
        url = re.search(r"Airflow UI:\s+(http://127\.0\.0\.1:\d+)", out).group(1)
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        names = re.findall(r"^  (\S+)\s+pid \d+", out, re.MULTILINE)
        assert names == ["postgres", "redis", "airflow-api-server", "airflow-dag-processor", "airflow-scheduler",
                         "worker-1", "worker-2"], out
        assert "CeleryExecutor" in out and "2 workers x 2 task slots" in out
        assert api(f"{url}/api/v2/monitor/health")["metadatabase"]["status"] == "healthy"
        assert (tmp / "home" / "celery" / "postgres" / "PG_VERSION").read_text().strip() == "15"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(180) == 0 and "stopped." in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    shutil.rmtree(tmp, ignore_errors=True)
