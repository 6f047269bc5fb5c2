"""Crowd push and pull throughput against a real Label Studio, ours vs one SDK call per task, same run.

    .venv/bin/python benchmarks/crowd_throughput.py --tasks 5000

Push: ours = crowd.push.push (write-ahead log, batched imports of crowd.batch_size, tasks table) vs the SDK's
`tasks.create` once per task. Pull: N tasks carrying 3 annotations each (imported with their annotations,
as simulating 15,000 clicks would take the SQLite server ~25 minutes) ; ours = crowd.pull.pull (one JSON
export, dedupe, votes table) vs the SDK's `annotations.list` once per task. Starts its own server unless
SF_LABELSTUDIO_URL / SF_LABELSTUDIO_TOKEN / SF_LABELSTUDIO_FILES_ROOT name one. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from crowd.client import CrowdClient  # noqa: E402
from crowd.kinds import VERIFY  # noqa: E402
from crowd.provision import image_dir_of, provision  # noqa: E402
from crowd.pull import pull  # noqa: E402
from crowd.push import TASK_COLUMNS, push, server_tasks  # noqa: E402
from crowd.simulate import ensure_user  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.store import LocalStore  # noqa: E402

WNID = "n01440764"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    from fixtures_labelstudio import make_images, write_synsets

    server = base = None
    if os.environ.get("SF_LABELSTUDIO_URL"):
        url, token = os.environ["SF_LABELSTUDIO_URL"], os.environ["SF_LABELSTUDIO_TOKEN"]
        files_root = Path(os.environ["SF_LABELSTUDIO_FILES_ROOT"])
    else:
        from crowd.server import start_labelstudio

        base = Path(tempfile.mkdtemp(prefix="sf-bench-ls-"))
        files_root = base / "files"
        files_root.mkdir()
        t = time.perf_counter()
        server = start_labelstudio(base / "data", files_root=files_root, timeout=300)
        url, token = server.url, server.token
        print(f"Label Studio ready in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    try:
        n = args.tasks
        store = LocalStore(files_root / f"bench-{uuid.uuid4().hex[:6]}")
        images = make_images(store, n, seed=5, size=(32, 24))
        synsets = write_synsets(store)
        prefix = f"bench{uuid.uuid4().hex[:4]}"
        settings = load_settings(env={}, overrides={"store": {"url": str(store.root)}, "crowd": {
            "url": url, "token": token, "pseudonym_key": "bench", "files_root": str(files_root), "project_prefix": prefix,
            "gold_rate": 0.0, "batch_size": args.batch_size}})
        client = CrowdClient(url, token)
        plan = pd.DataFrame({"image_id": images["image_id"], "wnid": WNID, "n_more": 3})

        # --- push: ours
        pid = provision(client, settings, image_dir=image_dir_of(store))["verify"]
        t = time.perf_counter()
        out = push(store, client, settings, project_id=pid, plan=plan, synsets=synsets, images=images)
        ours_push = time.perf_counter() - t
        assert out["pushed"] == n, out
        # --- push: one SDK call per task (same task data, no bookkeeping)
        settings2 = settings.model_copy(update={"crowd": settings.crowd.model_copy(update={"project_prefix": prefix + "b"})})
        pid_b = provision(client, settings2, image_dir=image_dir_of(store))["verify"]
        ctx_tasks = server_tasks(client, pid)
        datas = [t_["data"] for t_ in client.iter_tasks(pid)]
        t = time.perf_counter()
        for d in datas:
            client.sdk.tasks.create(project=pid_b, data=d)
        sdk_push = time.perf_counter() - t
        assert len(server_tasks(client, pid_b)) == n

        # --- pull: N tasks with 3 annotations each
        users = [ensure_user(client, f"{prefix}-w{i}@synsetforge.local", "bench-pass-2026") for i in range(3)]
        settings3 = settings.model_copy(update={"crowd": settings.crowd.model_copy(update={"project_prefix": prefix + "c"})})
        pid_c = provision(client, settings3, image_dir=image_dir_of(store))["verify"]
        store_c = LocalStore(files_root / f"bench-pull-{uuid.uuid4().hex[:6]}")
        rows = []
        for start in range(0, n, args.batch_size):
            chunk = datas[start:start + args.batch_size]
            body = [{"data": {**d, "request_id": f"pull-{d['request_id']}"},
                     "annotations": [{"result": VERIFY.render("yes" if (k + j) % 3 else "no", d), "completed_by": u,
                                      "lead_time": 2.0 + j} for j, u in enumerate(users)]}
                    for k, d in enumerate(chunk)]
            resp = client.request("POST", f"/api/projects/{pid_c}/import", params={"return_task_ids": "true"}, json=body)
            for d, tid in zip(chunk, resp.json()["task_ids"], strict=True):
                rows.append({"task_id": tid, "project_id": pid_c, "request_id": f"pull-{d['request_id']}",
                             "image_id": d["image_id"], "wnid": WNID, "kind": "verify", "is_gold": False,
                             "gold_answer": None, "pushed_at": datetime.now(UTC)})
        store_c.write_table("tasks", pd.DataFrame(rows, columns=TASK_COLUMNS))
        t = time.perf_counter()
        pulled = pull(store_c, client, settings3, project_ids=[pid_c])
        ours_pull = time.perf_counter() - t
        t = time.perf_counter()
        again = pull(store_c, client, settings3, project_ids=[pid_c])
        ours_repull = time.perf_counter() - t
        assert pulled["new_votes"] == 3 * n and again["new_votes"] == 0, (pulled, again)
        t = time.perf_counter()
        n_sdk = 0
        for r in rows:
            n_sdk += len(client.sdk.annotations.list(id=r["task_id"]))
        sdk_pull = time.perf_counter() - t
        assert n_sdk == 3 * n

        a = 3 * n
        print(f"\n{n} tasks, batch {args.batch_size}, Label Studio 1.23.2 (SQLite), label-studio-sdk 2.1.2, "
              f"{datetime.now(UTC):%Y-%m-%d}\n")
        print("| step | ours (s) | ours rate | SDK one call per task (s) | SDK rate | speed-up |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| push {n} tasks | {ours_push:.1f} | {n / ours_push:,.0f} tasks/s | {sdk_push:.1f} | "
              f"{n / sdk_push:,.0f} tasks/s | {sdk_push / ours_push:.1f}x |")
        print(f"| pull {a} annotations | {ours_pull:.1f} | {a / ours_pull:,.0f} ann/s | {sdk_pull:.1f} | "
              f"{a / sdk_pull:,.0f} ann/s | {sdk_pull / ours_pull:.1f}x |")
        print(f"| re-pull (0 new rows) | {ours_repull:.1f} | {a / ours_repull:,.0f} ann/s scanned | | | |")
        print(f"\nours push includes write-ahead log, tasks table writes and a server reconcile listing; "
              f"ours pull includes pseudonymisation, the votes table and worker_gold. ({len(ctx_tasks)} tasks listed)")
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
