"""Dawid-Skene speed: ours (numpy bincount EM) vs crowd-kit 1.4.2 per EM iteration, and a streamed
100M-vote run with bounded memory.

    # crowd-kit 1.4.2 is in the project lock (requirements.txt), so both run in .venv:
    .venv/bin/python benchmarks/qc_speed.py compare --votes 1000000
    /usr/bin/time -v .venv/bin/python benchmarks/qc_speed.py stream --votes 100000000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.qc.dawid_skene import DawidSkene  # noqa: E402


def generate(n_votes: int, votes_per_task: int, n_workers: int, rng: np.random.Generator, task_offset: int = 0):
    n_tasks = n_votes // votes_per_task
    truth = rng.integers(0, 2, n_tasks)
    t = np.repeat(np.arange(n_tasks), votes_per_task)
    w = rng.integers(0, n_workers, len(t))
    acc = np.random.default_rng(0).beta(8, 2, n_workers)
    ok = rng.random(len(t)) < acc[w]
    lab = np.where(ok, truth[t], 1 - truth[t])
    return (t + task_offset).astype(np.int32), w.astype(np.int32), lab.astype(np.int8), truth


def compare(args: argparse.Namespace) -> None:
    from crowdkit.aggregation import DawidSkene as CK

    t, w, lab, truth = generate(args.votes, 10, args.workers, np.random.default_rng(1))
    df = pd.DataFrame({"task": t, "worker": w, "label": lab}).drop_duplicates(["task", "worker"])
    rows = []
    for name, make in [("crowd-kit 1.4.2 DawidSkene", lambda: CK(n_iter=args.iters, tol=-np.inf)),
                       ("synsetforge DawidSkene (numpy)", lambda: DawidSkene(n_iter=args.iters, tol=-np.inf))]:
        model = make()
        t0 = time.perf_counter()
        model.fit(df)
        dt = time.perf_counter() - t0
        n_it = len(model.loss_history_)
        labels = model.labels_.sort_index().to_numpy().astype(int)
        rows.append({"implementation": name, "votes": len(df), "EM iterations": n_it, "total s": round(dt, 2),
                     "s / iteration": round(dt / n_it, 4), "accuracy %": round(100 * (labels == truth).mean(), 3),
                     "_labels": labels})
    same = bool((rows[0]["_labels"] == rows[1]["_labels"]).all())
    speedup = rows[0]["s / iteration"] / rows[1]["s / iteration"]
    for r in rows:
        r.pop("_labels")
    print(f"\n{len(df):,} votes, {args.workers:,} workers, 10 votes/task, both fitted {args.iters} EM iterations "
          f"from the same majority-vote start\n")
    print(_md(pd.DataFrame(rows)))
    print(f"\nspeed-up per iteration: {speedup:.1f}x; identical labels: {same}")


def stream(args: argparse.Namespace) -> None:
    chunk = args.chunk
    folder = Path(args.dir or tempfile.mkdtemp(prefix="sf-qc-stream-"))
    folder.mkdir(parents=True, exist_ok=True)
    parts = sorted(folder.glob("part-*.npz"))
    t0 = time.perf_counter()
    n_tasks = args.votes // 10
    if len(parts) * chunk < args.votes:
        for p in parts:
            p.unlink()
        rng = np.random.default_rng(2)
        for i, start in enumerate(range(0, args.votes, chunk)):
            t, w, lab, _ = generate(min(chunk, args.votes - start), 10, args.workers, rng, task_offset=start // 10)
            np.savez(folder / f"part-{i:05d}.npz", task=t, worker=w, label=lab)
        parts = sorted(folder.glob("part-*.npz"))
    gen_s = time.perf_counter() - t0

    def source():
        for p in parts:
            with np.load(p) as z:
                yield z["task"], z["worker"], z["label"]

    t1 = time.perf_counter()
    ds = DawidSkene(n_iter=args.iters, tol=1e-5).fit_stream(source, n_tasks, args.workers, 2)
    fit_s = time.perf_counter() - t1
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("\n| votes | tasks | workers | chunk | EM iterations | generate s | fit s | s / iteration | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.votes:,} | {n_tasks:,} | {args.workers:,} | {chunk:,} | {ds.n_iter_} | {gen_s:.0f} | {fit_s:.0f} | "
          f"{fit_s / max(ds.n_iter_, 1):.1f} | {peak_mb:.0f} |")
    if not args.keep and not args.dir:
        shutil.rmtree(folder, ignore_errors=True)


def _md(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--votes", type=int, default=1_000_000)
    c.add_argument("--workers", type=int, default=2_000)
    c.add_argument("--iters", type=int, default=10)
    s = sub.add_parser("stream")
    s.add_argument("--votes", type=int, default=100_000_000)
    s.add_argument("--workers", type=int, default=20_000)
    s.add_argument("--chunk", type=int, default=5_000_000)
    s.add_argument("--iters", type=int, default=20)
    s.add_argument("--dir", help="keep the generated vote chunks here (reused on the next run)")
    s.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    compare(args) if args.mode == "compare" else stream(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
