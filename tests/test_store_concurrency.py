"""Working tables under concurrent writers, with real processes, on a folder and on a moto S3 server.

Each writer is a separate Python process (the WRITER script below, run with subprocess), so commits race
through the backend's put-if-absent exactly as two DAG tasks, or a DAG task and the CLI, would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.store import LocalStore, S3Store, TableConflict

pytestmark = pytest.mark.slow  # the s3 half starts a moto server; processes start Python and delta-rs

ROOT = Path(__file__).resolve().parent.parent

WRITER = textwrap.dedent('''
    import json, sys
    import pandas as pd
    from pipeline.store import LocalStore, S3Store

    spec, action = json.loads(sys.argv[1]), sys.argv[2]
    if spec["kind"] == "local":
        store = LocalStore(spec["root"])
    else:
        import boto3
        store = S3Store(spec["bucket"], spec["prefix"], client=boto3.client("s3", endpoint_url=spec["endpoint"]))

    def votes(ids):
        ids = list(ids)
        return pd.DataFrame({
            "annotation_id": ids, "task_id": [i // 3 for i in ids], "image_id": [f"img{i % 97:04d}" for i in ids],
            "wnid": [f"n{i % 5:08d}" for i in ids], "worker": [f"w-{i % 7}" for i in ids],
            "answer": ["yes" if i % 2 else "no" for i in ids], "is_gold": [False] * len(ids),
            "lead_time_s": [1.0] * len(ids), "submitted_at": pd.to_datetime(ids, unit="s", utc=True)})

    if action == "append":  # batches of ids start, start+1, ... (step = stride)
        start, n_batches, size, stride, unique = map(int, sys.argv[3:8])
        for b in range(n_batches):
            ids = range(start + b * size * stride, start + (b + 1) * size * stride, stride)
            store.append_table("votes", votes(ids), unique_by="annotation_id" if unique else None)
    elif action == "compact":
        for _ in range(int(sys.argv[3])):
            store.compact("votes")
    print("done", flush=True)
''')


@pytest.fixture
def backend(request, tmp_path):
    """(store in this process, JSON spec that rebuilds it in a child process)."""
    if request.param == "local":
        root = tmp_path / "store"
        return LocalStore(root), {"kind": "local", "root": str(root)}
    client, bucket = request.getfixturevalue("s3_bucket")
    endpoint = client.meta.endpoint_url
    return S3Store(bucket, "root", client=client), {"kind": "s3", "bucket": bucket, "prefix": "root", "endpoint": endpoint}


both = pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)


def spawn(tmp_path: Path, spec: dict, *args: object, env: dict | None = None) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), json.dumps(spec), *map(str, args)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "done" in out, err[-3000:]


def ids(store) -> list[int]:
    return store.read_table("votes", columns=["annotation_id"]).column("annotation_id").to_pylist()


@both
def test_three_processes_appending_at_once_lose_nothing(backend, tmp_path):
    store, spec = backend
    # interleaved ids: writer k appends k, k+3, k+6, ... in 6 batches of 10
    finish([spawn(tmp_path, spec, "append", k, 6, 10, 3, 0) for k in range(3)])
    got = ids(store)
    assert sorted(got) == list(range(180)) and len(got) == 180
    assert store.table_version("votes") == 17  # 18 commits: every append landed as its own commit


@both
def test_overlapping_unique_appends_land_each_key_once(backend, tmp_path):
    store, spec = backend
    # both writers push the same 0..99 (as two pullers of one export would), in batches of 20
    finish([spawn(tmp_path, spec, "append", 0, 5, 20, 1, 1) for _ in range(2)])
    got = ids(store)
    assert sorted(got) == list(range(100))


@both
def test_cli_compaction_while_a_task_appends_loses_nothing(backend, tmp_path):
    store, spec = backend
    appender = spawn(tmp_path, spec, "append", 0, 12, 25, 1, 0)
    url = str(store.root) if isinstance(store, LocalStore) else f"s3://{spec['bucket']}/{spec['prefix']}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SYNSETFORGE_S3_ENDPOINT_URL": spec.get("endpoint", "")}
    compactions = 0
    while appender.poll() is None or compactions == 0:
        if store.has_table("votes"):
            cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "--store", url, "store", "compact", "votes"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert cli.returncode == 0, cli.stderr[-3000:]
            compactions += 1
    finish([appender])
    assert sorted(ids(store)) == list(range(300))
    ops = [h.get("synsetforge.operation") for h in store.table_history("votes")]
    assert "compact" in ops and ops.count("append") == 12


@both
def test_overwrite_racing_an_append_from_another_process_fails_loudly(backend, tmp_path):
    store, spec = backend
    finish([spawn(tmp_path, spec, "append", 0, 1, 10, 1, 0)])
    seen = store.read_table("votes").to_pandas()
    finish([spawn(tmp_path, spec, "append", 10, 1, 5, 1, 0)])  # another process commits after the read
    with pytest.raises(TableConflict):
        store.write_table("votes", seen.iloc[:3])  # would have dropped the other process's rows
    assert sorted(ids(store)) == list(range(15))
    fresh = store.read_table("votes").to_pandas()  # the retry: read again, write again
    store.write_table("votes", fresh.iloc[:3])
    assert len(ids(store)) == 3


@both
def test_writer_killed_between_data_files_and_commit_leaves_last_commit(backend, tmp_path):
    store, spec = backend
    finish([spawn(tmp_path, spec, "append", 0, 1, 10, 1, 0)])
    before = store.table_version("votes")
    marks = tmp_path / "marks"
    marks.mkdir()
    killed = spawn(tmp_path, spec, "append", 100, 1, 10, 1, 0,
                   env={"SYNSETFORGE_FAILPOINTS": "store.data_written=kill", "SYNSETFORGE_FAILPOINT_DIR": str(marks)})
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    files = [k for k in store.list("tables/votes/") if k.endswith(".parquet")]
    assert len(files) == 2  # the killed writer's data file is there, named by no commit
    assert store.table_version("votes") == before and sorted(ids(store)) == list(range(10))
    finish([spawn(tmp_path, spec, "append", 100, 1, 10, 1, 0,
                  env={"SYNSETFORGE_FAILPOINTS": "store.data_written=kill", "SYNSETFORGE_FAILPOINT_DIR": str(marks)})])
    assert sorted(ids(store)) == [*range(10), *range(100, 110)]  # the rerun goes through
