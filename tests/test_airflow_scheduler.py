"""What a data engineer sees with a real Airflow: api-server + scheduler (LocalExecutor, parallelism 2) +
dag-processor started by the project on 127.0.0.1. The vocabulary DAG is triggered with Params through the
REST API (as the UI's trigger form does); the collect DAG starts from its `synsets` Asset and runs 16 mapped
shards two at a time while one ingest worker process is killed (SIGKILL) halfway; its retry finishes the job.
The tables equal those of a serial dag.test() run of the same DAG, with no duplicate rows. Chromium then shows
the collect run's grid in the Airflow UI (the screenshot in the README)."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_dag, wait_for_text, wait_until
from PIL import Image

from pipeline.airflow_local import start_stack
from pipeline.store import open_store

pytestmark = pytest.mark.slow

# 16 ILSVRC-2012 dog classes: one mapped shard each.
WNIDS = ["n02085620", "n02085782", "n02085936", "n02086079", "n02086240", "n02086646", "n02086910", "n02087046",
         "n02087394", "n02088094", "n02088238", "n02088364", "n02088466", "n02088632", "n02089078", "n02089867"]
VOLATILE = {"candidates": ["found_at"], "images": ["fetched_at"]}  # wall-clock columns; everything else must match exactly


def make_corpus(folder: Path) -> None:
    """Four distinct photos per class, an exact copy and a near copy across classes, one junk file."""
    rng = np.random.default_rng(7)
    for w in WNIDS:
        (folder / w).mkdir(parents=True)
        for j in range(4):
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((160, 120), Image.BICUBIC).save(folder / w / f"{j}.jpg", quality=90)
    shutil.copy(folder / WNIDS[0] / "0.jpg", folder / WNIDS[2] / "copy.jpg")
    Image.open(folder / WNIDS[0] / "1.jpg").save(folder / WNIDS[1] / "recompressed.jpg", quality=60)
    (folder / WNIDS[3] / "junk.jpg").write_bytes(b"<html>not an image</html>")


def api(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def world(artifacts_dir):
    tmp = Path(tempfile.mkdtemp(prefix="sf-scheduler-"))
    make_corpus(tmp / "photos")
    (tmp / "classes.txt").write_text("\n".join(WNIDS) + "\n")
    (tmp / "faults").mkdir()
    env = {  # what asset-triggered runs read: they get no Params from the run that triggered them
        "SYNSETFORGE__COLLECT__SOURCES": '["local_dir"]',
        "SYNSETFORGE__COLLECT__LOCAL_DIR": str(tmp / "photos"),
        "SYNSETFORGE__COLLECT__SHARD_SIZE": "1",
        "SYNSETFORGE__INGEST__FLUSH_EVERY": "2",
        "SYNSETFORGE_FAILPOINTS": "ingest.part_written=kill",  # the first part written kills its worker
        "SYNSETFORGE_FAILPOINT_DIR": str(tmp / "faults"),
    }
    stack = start_stack(tmp / "airflow", env=env, log_dir=artifacts_dir / "airflow-stack")
    try:
        yield {"tmp": tmp, "url": stack.url, "stack": stack, "token": stack.token()}
    finally:
        stack.stop()
        assert all(s.process.poll() is not None for s in stack.services)
        shutil.rmtree(tmp, ignore_errors=True)


def runs_of(url: str, dag_id: str, token: str) -> list[dict]:
    return api(f"{url}/api/v2/dags/{dag_id}/dagRuns?order_by=-run_after", token=token)["dag_runs"]


def wait_for_run(url: str, dag_id: str, token: str, timeout: float, run_type: str | None = None) -> dict:
    def finished():
        runs = [r for r in runs_of(url, dag_id, token) if run_type is None or r["run_type"] == run_type]
        return runs[0] if runs and runs[0]["state"] in ("success", "failed") else None

    return wait_until(finished, timeout=timeout, what=f"a finished {dag_id} run")


def login_to_airflow(driver, url: str, username: str, password: str) -> None:
    """Through the sign-in form, as a data engineer would."""
    driver.get(url)
    user = wait_until(lambda: driver.find_element("css selector", "input[name=username], input[type=text]"),
                      timeout=90, what="the sign-in form")
    user.send_keys(username)
    driver.find_element("css selector", "input[type=password]").send_keys(password)
    driver.find_element("css selector", "button[type=submit]").click()
    wait_until(lambda: "login" not in driver.current_url, timeout=90, what="leaving the sign-in page")


def table_rows(store, name: str) -> list[tuple]:
    df = store.read_table(name).to_pandas().drop(columns=VOLATILE.get(name, []))
    return sorted(map(repr, df.astype(object).where(df.notna(), None).itertuples(index=False)))


def test_scheduler_runs_the_chain_in_parallel_survives_a_killed_worker_and_matches_a_serial_run(
        world, airflow_db, browser, artifacts_dir):
    url, tmp, token = world["url"], world["tmp"], world["token"]
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the API wants the login's token
        api(f"{url}/api/v2/dags")
    wait_until(lambda: {d["dag_id"] for d in api(f"{url}/api/v2/dags", token=token)["dags"]} >= {
        "synsetforge_vocabulary", "synsetforge_collect"} or None, timeout=180, what="the DAGs parsed")
    for dag_id in ("synsetforge_vocabulary", "synsetforge_collect"):  # new DAGs start paused
        assert api(f"{url}/api/v2/dags/{dag_id}", "PATCH", {"is_paused": False}, token)["is_paused"] is False

    store_dir = tmp / "store"
    triggered = api(f"{url}/api/v2/dags/synsetforge_vocabulary/dagRuns", "POST",
                    {"logical_date": None, "conf": {"wnid_file": str(tmp / "classes.txt"), "store": str(store_dir)}},
                    token)
    assert triggered["state"] == "queued" and triggered["conf"]["store"] == str(store_dir)
    vocab = wait_for_run(url, "synsetforge_vocabulary", token, 300)
    assert vocab["state"] == "success", vocab
    collect = wait_for_run(url, "synsetforge_collect", token, 900, run_type="asset_triggered")
    assert collect["state"] == "success", collect

    tis = api(f"{url}/api/v2/dags/synsetforge_collect/dagRuns/{collect['dag_run_id']}/taskInstances?limit=100",
              token=token)
    by_task: dict[str, list[dict]] = {}
    for ti in tis["task_instances"]:
        by_task.setdefault(ti["task_id"], []).append(ti)
    assert len(by_task["collect_shard"]) == 16 and len(by_task["ingest_shard"]) == 16
    assert all(ti["state"] == "success" for group in by_task.values() for ti in group)
    killed = [ti for ti in by_task["ingest_shard"] if ti["try_number"] > 1]
    assert len(killed) == 1, "exactly one ingest worker was killed and retried"
    assert sorted(p.name for p in (tmp / "faults").iterdir()) == ["ingest.part_written.0"]
    starts = sorted((ti["start_date"], ti["end_date"]) for ti in by_task["collect_shard"])
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:], strict=False)), "shards never ran side by side"

    parallel = open_store(store_dir)
    assert parallel.list("ingest/parts/") == [] and parallel.list("collect/parts/") == []
    images = parallel.read_table("images").to_pandas()
    links = parallel.read_table("image_links").to_pandas()
    assert not images.duplicated("first_url").any() and not links.duplicated(["image_id", "wnid"]).any()
    assert (images.status == "accepted").sum() == 16 * 4 + 1  # + the re-compressed copy; the exact copy is one image
    assert images.loc[images.status == "rejected", "reject_reason"].tolist() == ["not_an_image"]
    assert links.multi_synset.sum() >= 2  # the exact copy is linked to two classes

    serial_dir = tmp / "serial"
    serial = open_store(serial_dir)
    serial.write_table("synsets", parallel.read_table("synsets"))
    conf = {"sources": ["local_dir"], "local_dir": str(tmp / "photos"), "shard_size": 1, "store": str(serial_dir)}
    assert run_dag("synsetforge_collect", conf).state == "success"  # dag.test(): one task at a time, no faults
    for name in ("candidates", "images", "image_links"):
        assert table_rows(parallel, name) == table_rows(serial, name), f"{name} differs from the serial run"

    login_to_airflow(browser, url, world["stack"].username, world["stack"].password)
    browser.get(f"{url}/dags/synsetforge_collect/runs/{collect['dag_run_id']}")
    body = wait_for_text(browser, "ingest_shard", "merge_images", "Success", timeout=90)
    assert "synsetforge_collect" in body
    browser.save_screenshot(str(artifacts_dir / "airflow-grid.png"))
    shutil.copy(artifacts_dir / "airflow-grid.png", artifacts_dir / "docs" / "airflow-grid.png")


def test_synsetforge_airflow_up_serves_the_ui_and_stops_every_process_on_ctrl_c(tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).with_name("synsetforge")), "--store", str(tmp_path / "store"),
           "airflow", "up", "--home", str(tmp_path / "home"), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        while not any("Ctrl-C stops all" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "synsetforge airflow up exited early:\n" + "".join(lines)
            lines.append(line)
        out = "".join(lines)
        url = re.search(r"Airflow UI:\s+(http://127\.0\.0\.1:\d+)", out).group(1)
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        assert len(pids) == 3 and f"store:       {tmp_path / 'store'}" in out
        assert api(f"{url}/api/v2/monitor/health")["metadatabase"]["status"] == "healthy"
        password = re.search(r"user admin\s+password (\S+)", out).group(1)
        assert json.loads((tmp_path / "home" / "simple_auth_manager_passwords.json").read_text()) == {"admin": password}
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(120) == 0 and "stopped." in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
