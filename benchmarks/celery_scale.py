"""Collect + ingest of 10,000 loopback URLs by the collect DAG on Airflow's LocalExecutor and on the CeleryExecutor
with one and with two workers, in one run.

    flock /tmp/sf-heavy.lock .venv/bin/python benchmarks/celery_scale.py                 # 10,000 URLs, 10 shards
    flock /tmp/sf-heavy.lock .venv/bin/python benchmarks/celery_scale.py --urls 1000     # smoke size

A threaded HTTP server in this process serves `--urls` distinct JPEGs (160x120, made up front) on 127.0.0.1; a
url_list file gives each of `--synsets` synsets its share, one synset per shard. All URLs are on one host, so
`--per-host` (default 32, the ingest concurrency) stands in for a crawl over many hosts. For each executor a fresh stack is
started (`airflow_local.start_stack`: LocalExecutor, parallelism 2; `celery_stack.start_celery_stack`: PostgreSQL,
Redis, `--concurrency` slots per worker, 1 or 2 workers), the DAGs parse, the collect DAG is triggered through the
REST API into a store of its own, and the run's wall time is taken from Airflow's own start and end dates.

CPU: every process of the stack is sampled before the trigger and after the run, with psutil (user + system, plus
reaped children: the task runners a worker or the LocalExecutor forked and waited for), split into the processes that
run tasks (the Celery workers; below the LocalExecutor's scheduler, the processes it forks for tasks) and the rest
(api-server, dag-processor, the scheduler's own loop, PostgreSQL, Redis). CPU seconds per task = task-side CPU / mapped and unmapped task
instances of the run; this process's own CPU (the image server, which a real crawl would not run) is given apart.
On a machine with C cores a run cannot beat (all CPU seconds) / C; the busy seconds per task (Airflow's durations)
against the wall time show how much of the run is scheduling hand-offs rather than work.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WNIDS = ["n02085620", "n02085782", "n02085936", "n02086079", "n02086240", "n02086646", "n02086910", "n02087046",
         "n02087394", "n02088094", "n02088238", "n02088364", "n02088466", "n02088632", "n02089078", "n02089867"]


def make_images(n: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(20)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((160, 120), Image.BICUBIC).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def serve(images: list[bytes]) -> ThreadingHTTPServer:
    from pipeline.services import serve_in_thread

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: without this, delayed ACKs cost ~40 ms each

        def do_GET(self):  # noqa: N802 - http.server's name
            try:
                body = images[int(self.path.rsplit("/", 1)[-1].split(".")[0])]
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    serve_in_thread(server, "images")
    return server


def own_cpu_seconds(pid: int) -> float:
    """user + system of the process itself (not of its children)."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def cpu_seconds(pids: list[int]) -> float:
    """user + system of each process and every process below it, reaped children included."""
    import psutil

    seen, total = set(), 0.0
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    return total


def api(stack, path: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> dict:
    req = urllib.request.Request(stack.url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(what)


def run_one(label: str, stack, task_pids: list[int], other_pids: list[int], store: Path, url_list: Path,
            n_synsets: int, per_host: int, own_only: list[int] = ()) -> dict:
    """`own_only`: processes in `task_pids` whose own CPU is not task work (the LocalExecutor's scheduler loop,
    whose forked task runners are): moved to the other side."""
    token = stack.token()
    wait(lambda: "synsetforge_collect" in {d["dag_id"] for d in api(stack, "/api/v2/dags", token=token)["dags"]},
         300, "the DAGs parsed")
    api(stack, "/api/v2/dags/synsetforge_collect", "PATCH", {"is_paused": False}, token)
    time.sleep(3)  # let the processes settle after start-up before the first sample
    own_before = sum(map(own_cpu_seconds, own_only))
    before_task, before_other = cpu_seconds(task_pids) - own_before, cpu_seconds(other_pids) + own_before
    conf = {"sources": ["url_list"], "url_list": str(url_list), "shard_size": 1, "store": str(store),
            "per_synset_budget": 100000, "allowed_networks": ["127.0.0.0/8"], "per_host": per_host}
    run = api(stack, "/api/v2/dags/synsetforge_collect/dagRuns", "POST", {"logical_date": None, "conf": conf}, token)
    rid = run["dag_run_id"]
    done = wait(lambda: (r := api(stack, f"/api/v2/dags/synsetforge_collect/dagRuns/{rid}", token=token))["state"]
                in ("success", "failed") and r, 3600, "the collect run")
    own_after = sum(map(own_cpu_seconds, own_only))
    after_task, after_other = cpu_seconds(task_pids) - own_after, cpu_seconds(other_pids) + own_after
    tis = api(stack, f"/api/v2/dags/synsetforge_collect/dagRuns/{rid}/taskInstances?limit=200",
              token=token)["task_instances"]
    wall = (datetime.fromisoformat(done["end_date"]) - datetime.fromisoformat(done["start_date"])).total_seconds()
    from pipeline.store import open_store

    images = open_store(store).read_table("images").to_pandas()
    task_cpu, other_cpu = after_task - before_task, after_other - before_other
    durations = {}
    for ti in tis:
        durations.setdefault(ti["task_id"], []).append(ti["duration"] or 0.0)
    return {"label": label, "state": done["state"], "wall_s": wall, "tasks": len(tis),
            "accepted": int((images.status == "accepted").sum()), "rows": len(images),
            "task_cpu_s": task_cpu, "other_cpu_s": other_cpu, "cpu_per_task_s": task_cpu / max(1, len(tis)),
            "busy_s": {k: sum(v) for k, v in durations.items()}, "n_synsets": n_synsets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=10000)
    parser.add_argument("--synsets", type=int, default=10, help="synsets = shards (one synset per shard)")
    parser.add_argument("--concurrency", type=int, default=1, help="task slots per Celery worker")
    parser.add_argument("--per-host", type=int, default=32,
                        help="downloads in flight per host and task (every URL here is on one host; a crawl spreads "
                             "them over many, so the default lifts ingest.per_host's politeness limit of 4)")
    parser.add_argument("--only", choices=["local", "celery1", "celery2"], action="append")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("NLTK_DATA", str(ROOT / ".nltk_data"))

    from pipeline.airflow_local import start_stack
    from pipeline.celery_stack import start_celery_stack
    from pipeline.config import load_settings
    from pipeline.store import open_store
    from pipeline.vocabulary import run_vocabulary

    tmp = Path(tempfile.mkdtemp(prefix="sf-bench-celery-"))
    tmp.chmod(0o711)  # PostgreSQL runs as the postgres user under root and must reach its folder
    t0 = time.monotonic()
    images = make_images(args.urls)
    server = serve(images)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    wnids = WNIDS[:args.synsets]
    url_list = tmp / "urls.txt"
    url_list.write_text("".join(f"{base}/img/{i}.jpg {wnids[i % len(wnids)]}\n" for i in range(args.urls)))
    (tmp / "classes.txt").write_text("\n".join(wnids) + "\n")
    settings = load_settings(env={}, overrides={"store": {"url": str(tmp / "vocab")},
                                                "vocabulary": {"wnid_file": str(tmp / "classes.txt")}})
    run_vocabulary(settings, open_store(tmp / "vocab"), log=lambda *a, **k: None)
    synsets = open_store(tmp / "vocab").read_table("synsets")
    print(f"corpus: {args.urls} JPEGs ({sum(map(len, images)) / len(images) / 1024:.1f} KiB each) in "
          f"{time.monotonic() - t0:.0f}s; {len(wnids)} synsets, one per shard", flush=True)

    results = []
    for label in args.only or ["local", "celery1", "celery2"]:
        store = tmp / f"store-{label}"
        open_store(store).write_table("synsets", synsets)
        home = tmp / f"home-{label}"
        env = {"SYNSETFORGE__STORE__URL": str(store)}
        print(f"[{label}] starting the stack ...", flush=True)
        if label == "local":
            stack = start_stack(home, env=env, log_dir=tmp / f"logs-{label}")
            sched = [s for s in stack.services if s.name == "airflow-scheduler"]
            task_side = [s.pid for s in sched]
        else:
            stack = start_celery_stack(home, workers=int(label[-1]), concurrency=args.concurrency, env=env,
                                       log_dir=tmp / f"logs-{label}", fsync=False)
            task_side = [s.pid for s in stack.workers]
        other = [s.pid for s in stack.services if s.pid not in task_side]
        own = resource.getrusage(resource.RUSAGE_SELF)
        try:
            result = run_one(label, stack, task_side, other, store, url_list, len(wnids), args.per_host,
                             own_only=task_side if label == "local" else [])
        finally:
            stack.stop()
        after = resource.getrusage(resource.RUSAGE_SELF)
        result["server_cpu_s"] = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime  # the image server
        result["load1"] = os.getloadavg()[0]
        results.append(result)
        print(f"[{label}] {result['state']}: {result['wall_s']:.1f}s wall, {result['accepted']} accepted of "
              f"{result['rows']}, task CPU {result['task_cpu_s']:.1f}s over {result['tasks']} tasks "
              f"({result['cpu_per_task_s']:.2f}s per task), other CPU {result['other_cpu_s']:.1f}s", flush=True)
    server.shutdown()

    cores = os.cpu_count() or 1
    by = {r["label"]: r for r in results}
    print(f"\n{args.urls} URLs, {len(wnids)} shards, {cores} cores, {args.concurrency} slot(s) per Celery worker, "
          f"per_host {args.per_host}\n")
    print("| executor | wall s | URLs/s | task CPU s | CPU s per task | other CPU s | image server CPU s | "
          "CPU-bound floor on this machine s |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"local": "LocalExecutor (parallelism 2)", "celery1": "CeleryExecutor, 1 worker",
             "celery2": "CeleryExecutor, 2 workers"}
    for r in results:
        floor = (r["task_cpu_s"] + r["other_cpu_s"] + r["server_cpu_s"]) / cores
        print(f"| {names[r['label']]} | {r['wall_s']:.1f} | {args.urls / r['wall_s']:.0f} | {r['task_cpu_s']:.1f} | "
              f"{r['cpu_per_task_s']:.2f} | {r['other_cpu_s']:.1f} | {r['server_cpu_s']:.1f} | {floor:.1f} |")
    if "celery1" in by and "celery2" in by:
        print(f"\ntwo workers / one worker: {by['celery1']['wall_s'] / by['celery2']['wall_s']:.2f}x faster")
    if "local" in by and "celery2" in by:
        print(f"two Celery workers / LocalExecutor: {by['local']['wall_s'] / by['celery2']['wall_s']:.2f}x")
    for r in results:
        print(f"{r['label']}: task busy seconds {json.dumps({k: round(v, 1) for k, v in r['busy_s'].items()})}, "
              f"load average at the end {r['load1']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r["state"] == "success" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
