"""Pull cost against project size (issue 18), on one real Label Studio: watermark pull vs the old full export.

    flock /tmp/sf-heavy.lock .venv/bin/python benchmarks/crowd_pull.py --tasks 50000

Target: a pull of 1,000 new annotations from a project that already holds 50,000 annotated tasks costs <= 2x the
same pull from an empty project.

One Label Studio 1.23.2 (crowd.server.start_labelstudio: 127.0.0.1, its own data dir under /tmp/crowdpull,
stopped by PID at the end, also on error). Two stores, each with its own project prefix and so its own projects
table (`pull` picks every live project of a store): project A (overlap 1) is seeded with --tasks tasks that
already carry one completed annotation each (Label Studio's import API with an `annotations` list, --seed-batch
tasks per call) and pulled once, so its votes hold them and its watermark is current; project B is empty. Each
round then imports --batch new annotated tasks into each project and times `crowd.pull.pull` on each store
(order alternated between rounds), counting its HTTP requests and the time spent in them; after that it times
what pull did before the watermark (commit a85d884): a full JSON export of the project (export endpoint, no
task ids). Every task is built as push builds it (request id, task data, one `push_requests` and one `tasks`
row per task, appended per import batch), so pull reads them as pushed tasks.

Settings: crowd.project_size is set above what A will hold (at the default 50,000 a project of 50,000 tasks is
full and gets no new task); crowd.pull_lag_s is --lag-s (default 0: each pull reads only its own round's tasks;
with the project's 60 s and rounds seconds apart, every pull would also read the previous round's batch again,
in both projects alike). Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from crowd.client import CrowdClient, task_filter  # noqa: E402
from crowd.kinds import REQUEST_COLUMNS, TASK_COLUMNS, TASK_KEY, VERIFY, request_id  # noqa: E402
from crowd.provision import image_dir_of, provision, read_projects  # noqa: E402
from crowd.pull import pull  # noqa: E402
from crowd.push import image_url_resolver, server_tasks  # noqa: E402
from crowd.simulate import ensure_user  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.store import LocalStore, content_key  # noqa: E402

WNID = "n01440764"
TMP = Path("/tmp/crowdpull")


class Meter:
    """Counts the HTTP requests a CrowdClient sends and the wall time spent in them (body download included)."""

    def __init__(self, client: CrowdClient):
        self.n: Counter[str] = Counter()
        self.s: Counter[str] = Counter()
        http = client._http
        send = http.send

        def timed(request: Any, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return send(request, *a, **k)
            finally:
                route = _route(request.url.path)
                self.n[route] += 1
                self.s[route] += time.perf_counter() - t

        http.send = timed  # type: ignore[method-assign]

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.n), Counter(self.s)


def _route(path: str) -> str:
    if path.endswith("/export"):
        return "export"
    if path.rstrip("/") == "/api/tasks":
        return "listing"
    if path.startswith("/api/users"):
        return "users"
    if path.startswith("/api/projects"):
        return "projects"
    return path


class World:
    """One store, its settings and its project, with the bookkeeping push would have written."""

    def __init__(self, name: str, files_root: Path, client: CrowdClient, url: str, token: str, project_size: int,
                 lag_s: float, users: list[int]):
        from fixtures_labelstudio import write_synsets

        self.name = name
        self.client = client
        self.users = users
        self.store = LocalStore(files_root / f"store-{name}-{uuid.uuid4().hex[:6]}")
        self.synsets = write_synsets(self.store)
        self.settings = load_settings(env={}, overrides={"store": {"url": str(self.store.root)}, "crowd": {
            "url": url, "token": token, "pseudonym_key": "bench", "files_root": str(files_root),
            "project_prefix": f"pull{name}{uuid.uuid4().hex[:4]}", "gold_rate": 0.0, "project_size": project_size,
            "pull_lag_s": lag_s}})
        self.pid = provision(client, self.settings, overlap=1, image_dir=image_dir_of(self.store),
                             store=self.store)["verify"]
        self.n = 0  # tasks made so far
        self.seconds = 0.0

    def add(self, n: int, batch: int) -> None:
        """n new tasks, each with one completed annotation, as push would have made them (write-ahead request rows,
        the import, the tasks rows) but imported with their annotation."""
        t0 = time.perf_counter()
        syn = {r["wnid"]: r for r in self.synsets.to_dict("records")}
        for start in range(self.n, self.n + n, batch):
            idx = range(start, min(start + batch, self.n + n))
            image_ids = [f"{uuid.uuid5(uuid.NAMESPACE_URL, f'{self.name}/{i}').hex}{i:08x}" for i in idx]
            images = pd.DataFrame({"image_id": image_ids, "storage_key": [content_key(i, ".jpg") for i in image_ids]})
            resolve = image_url_resolver(self.store, images, files_root=self.settings.crowd.files_root, expiry_s=3600)
            ctx = {"synsets": syn, "examples": {}, "image_url": resolve}
            now = datetime.now(UTC)
            reqs = pd.DataFrame([{"request_id": request_id("verify", 0, i, WNID, 0), "project_id": self.pid,
                                  "image_id": i, "wnid": WNID, "kind": "verify", "is_gold": False,
                                  "gold_answer": None, "overlap": 1, "requested_at": now, "task_key": None}
                                 for i in image_ids], columns=REQUEST_COLUMNS)
            self.store.append_table("push_requests", reqs, unique_by="request_id")
            body = []
            for k, r in enumerate(reqs.to_dict("records")):
                data = VERIFY.build(r, ctx)
                data.update({"request_id": r["request_id"], "wnid": WNID, "kind": "verify", "image_id": r["image_id"]})
                answer = "yes" if (idx[k] % 5) else "no"
                body.append({"data": data, "annotations": [{
                    "result": VERIFY.render(answer, data), "completed_by": self.users[idx[k] % len(self.users)],
                    "lead_time": 1.5 + idx[k] % 7}]})
            after = self.n_floor()

            def existing(after: int = after) -> dict[str, int]:
                remote = server_tasks(self.client, self.pid, after_id=after)
                remote = remote[remote["request_id"].notna()]
                return dict(zip(remote["request_id"], remote["task_id"], strict=True))

            ids = self.client.import_tasks(self.pid, body, existing, what="the seed import")
            rows = [{"task_id": tid, "project_id": self.pid, "request_id": r["request_id"], "image_id": r["image_id"],
                     "wnid": WNID, "kind": "verify", "is_gold": False, "gold_answer": None,
                     "pushed_at": datetime.now(UTC)} for r, tid in zip(reqs.to_dict("records"), ids, strict=True)]
            self.store.append_table("tasks", pd.DataFrame(rows, columns=TASK_COLUMNS), unique_by=TASK_KEY)
            self._floor = max(int(i) for i in ids)
        self.n += n
        self.seconds += time.perf_counter() - t0

    def n_floor(self) -> int:
        return getattr(self, "_floor", 0)


def timed_pull(w: World, meter: Meter) -> dict[str, Any]:
    n0, s0 = meter.snapshot()
    t = time.perf_counter()
    out = pull(w.store, w.client, w.settings)
    wall = time.perf_counter() - t
    n1, s1 = meter.snapshot()
    return {**out, "wall": wall, "requests": sum((n1 - n0).values()), "http_s": sum((s1 - s0).values()),
            "by_route": {k: (n1[k] - n0[k], s1[k] - s0[k]) for k in n1 if n1[k] - n0[k]}}


def full_export(w: World) -> tuple[float, int, int]:
    t = time.perf_counter()
    body = w.client.export_json(w.pid)
    wall = time.perf_counter() - t
    return wall, len(body), sum(len(x.get("annotations") or []) for x in body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=50_000, help="annotated tasks project A holds before the rounds")
    ap.add_argument("--batch", type=int, default=1000, help="new annotated tasks per project per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed-batch", type=int, default=500, help="tasks per import call (crowd.batch_size)")
    ap.add_argument("--lag-s", type=float, default=0.0, help="crowd.pull_lag_s for these pulls")
    ap.add_argument("--workers", type=int, default=3, help="annotator accounts the annotations are spread over")
    args = ap.parse_args()
    from crowd.server import start_labelstudio

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server
    TMP.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="run-", dir=TMP))
    files_root = base / "files"
    files_root.mkdir()
    load0 = os.getloadavg()
    started = datetime.now(UTC)
    server = None
    try:
        t = time.perf_counter()
        server = start_labelstudio(base / "data", files_root=files_root, timeout=300)
        print(f"Label Studio pid {server.pid} ready in {time.perf_counter() - t:.0f}s at {server.url}",
              file=sys.stderr, flush=True)
        client = CrowdClient(server.url, server.token)
        users = [ensure_user(client, f"pull-w{i}@synsetforge.local", "bench-pass-2026") for i in range(args.workers)]
        size = args.tasks + args.batch * (args.rounds + 1) + 1000
        a = World("A", files_root, client, server.url, server.token, size, args.lag_s, users)
        b = World("B", files_root, client, server.url, server.token, size, args.lag_s, users)

        a.add(args.tasks, args.seed_batch)
        seed_s = a.seconds
        print(f"seeded A: {args.tasks} annotated tasks in {seed_s:.0f}s "
              f"({args.tasks / max(seed_s, 1e-9):,.0f} tasks/s)", file=sys.stderr, flush=True)
        open_a, done_a = (client.count_tasks(a.pid, [task_filter("is_labeled", "equal", v, "Boolean")])
                          for v in (False, True))
        with_ann = client.count_tasks(a.pid, [task_filter("total_annotations", "greater", 0, "Number")])
        proj = client.get_json(f"/api/projects/{a.pid}/")
        meter = Meter(client)
        first = timed_pull(a, meter)
        assert first["new_votes"] == args.tasks, first
        print(f"initial pull of A: {first['new_votes']} votes in {first['wall']:.1f}s, {first['requests']} requests; "
              f"A: {proj.get('task_number')} tasks, {with_ann} with annotations, {done_a} labeled (completed), "
              f"{open_a} not", file=sys.stderr, flush=True)
        assert open_a == 0 and done_a == with_ann == args.tasks, f"A's seeded tasks are not all completed: {open_a}"
        empty_b = timed_pull(b, meter)
        assert empty_b["new_votes"] == 0

        rounds = []
        for r in range(args.rounds):
            a.add(args.batch, args.seed_batch)
            b.add(args.batch, args.seed_batch)
            res = {}
            for w in ((a, b) if r % 2 == 0 else (b, a)):
                res[w.name] = timed_pull(w, meter)
                out = res[w.name]
                assert out["new_votes"] == args.batch, (w.name, out)
            ea = full_export(a)
            eb = full_export(b)
            rounds.append({"A": res["A"], "B": res["B"], "export_A": ea, "export_B": eb})
            print(f"round {r + 1}: A {res['A']['wall']:.2f}s ({res['A']['requests']} req), "
                  f"B {res['B']['wall']:.2f}s ({res['B']['requests']} req), full export A {ea[0]:.1f}s "
                  f"({ea[1]} tasks), B {eb[0]:.2f}s", file=sys.stderr, flush=True)
            for w in (a, b):
                wm = read_projects(w.store)["watermark"].max()
                print(f"  {w.name}: seen {res[w.name]['annotations_seen']}, watermark {wm}, "
                      f"{ {k: (n, round(s, 3)) for k, (n, s) in res[w.name]['by_route'].items()} }",
                      file=sys.stderr, flush=True)
        load1 = os.getloadavg()

        med = statistics.median
        print(f"\nLabel Studio 1.23.2 (SQLite) on {server.url}, {started:%Y-%m-%d %H:%M} UTC; project A holds "
              f"{args.tasks:,} annotated tasks before round 1, project B none; {args.batch:,} new annotated tasks per "
              f"project per round; crowd.pull_lag_s {args.lag_s:g}; load average {load0[0]:.2f} at start, "
              f"{load1[0]:.2f} at end\n")
        print("| round | pull A (s) | A requests | A in HTTP (s) | pull B (s) | B requests | B in HTTP (s) | A / B | "
              "full export A (s) | export A tasks / annotations | full export B (s) | full export A / pull A |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for i, x in enumerate(rounds, 1):
            pa, pb, ea, eb = x["A"], x["B"], x["export_A"], x["export_B"]
            print(f"| {i} | {pa['wall']:.2f} | {pa['requests']} | {pa['http_s']:.2f} | {pb['wall']:.2f} | "
                  f"{pb['requests']} | {pb['http_s']:.2f} | {pa['wall'] / pb['wall']:.2f}x | {ea[0]:.1f} | {ea[1]:,} / {ea[2]:,} | "
                  f"{eb[0]:.2f} | {ea[0] / pa['wall']:.1f}x |")
        wa = med([x["A"]["wall"] for x in rounds])
        wb = med([x["B"]["wall"] for x in rounds])
        ha = med([x["A"]["http_s"] for x in rounds])
        hb = med([x["B"]["http_s"] for x in rounds])
        xa = med([x["export_A"][0] for x in rounds])
        print(f"| median | {wa:.2f} | | {ha:.2f} | {wb:.2f} | | {hb:.2f} | **{wa / wb:.2f}x** | {xa:.1f} | | | "
              f"{xa / wa:.1f}x |")
        print("\nHTTP per route, median over rounds (requests, seconds):\n")
        print("| route | A requests | A (s) | B requests | B (s) |")
        print("|---|---:|---:|---:|---:|")
        routes = sorted({k for x in rounds for p in ("A", "B") for k in x[p]["by_route"]})
        for k in routes:
            cells = []
            for p in ("A", "B"):
                ns = [x[p]["by_route"].get(k, (0, 0.0)) for x in rounds]
                cells += [f"{med([n for n, _ in ns]):g}", f"{med([s for _, s in ns]):.3f}"]
            print(f"| {k} | " + " | ".join(cells) + " |")
        print(f"| outside HTTP (store, votes, worker_gold) | | {wa - ha:.2f} | | {wb - hb:.2f} |")
        verdict = "met" if wa / wb <= 2.0 else "NOT met"
        print(f"\nTarget (pull A <= 2x pull B): {verdict} ({wa / wb:.2f}x, medians of {len(rounds)} rounds). Seeding: "
              f"{args.tasks:,} tasks with their annotations in {seed_s:.0f}s; the initial pull of A "
              f"({first['new_votes']:,} votes) took {first['wall']:.1f}s.")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
