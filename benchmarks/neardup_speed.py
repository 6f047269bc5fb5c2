"""Candidate search speed: every pair within Hamming distance r among 1,000,000 64-bit hashes, exactly.

    .venv/bin/python -m benchmarks.neardup_speed [--n 1000000] [--radius 6] [--timeout 300]

Each method runs in its own subprocess (peak RSS measured per method). Random uniform hashes with planted pairs
at distances 0..r; "recall" = share of planted pairs found; exactness is checked against brute force on the
100,000 subset. Peers in the same run: brute-force numpy (100,000 subset) and faiss IndexBinaryMultiHash.
A method still running after --timeout wall seconds is stopped and reported as unfinished.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def make(n: int, radius: int, n_planted: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    a = rng.choice(n, n_planted, replace=False)
    b = (a + rng.integers(1, n, n_planted)) % n
    keep = ~np.isin(b, a)
    a, b = a[keep], b[keep]
    _, first = np.unique(b, return_index=True)
    a, b = a[first], b[first]
    mask = np.zeros(len(a), dtype=np.uint64)
    for i, k in enumerate(rng.integers(0, radius + 1, len(a))):
        for bit in rng.choice(64, int(k), replace=False):
            mask[i] |= np.uint64(1) << np.uint64(int(bit))
    h[b] = h[a] ^ mask
    return h, np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)


def _pairs_set(p: np.ndarray) -> np.ndarray:
    return np.unique(np.minimum(p[:, 0], p[:, 1]).astype(np.int64) * (1 << 32) + np.maximum(p[:, 0], p[:, 1]))


def run_method(method: str, n: int, radius: int) -> dict:
    h, planted = make(n, radius)
    sub = 100_000
    plan = ""
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if method == "synsetforge":
        from pipeline.ingest.neardup import HammingIndex

        idx = HammingIndex(radius, n_hint=n)
        idx.add(h)
        pairs = idx.self_pairs()
        data_n = n
        plan = f"{idx.m} chunks, {idx.k} equal ({len(idx.combos)} sorts)"
    elif method == "synsetforge_incremental":  # 900k indexed, then a 100k batch looked up and added
        from pipeline.ingest.neardup import HammingIndex

        idx = HammingIndex(radius, n_hint=n)
        idx.add(h[: n - sub])
        t0, cpu0 = time.perf_counter(), time.process_time()
        ids, old, inner = idx.add_and_query(h[n - sub :])
        pairs = np.concatenate([old, inner])
        data_n = n
        plan = (f"{idx.m} chunks, {idx.k} equal; segment sizes after the add: "
                f"{[len(s) for s in idx._segments]} (one segment per size class: the earlier one was not re-sorted)")
    elif method == "bruteforce_numpy":
        x = h[:sub]
        out = []
        for s in range(0, sub, 2000):
            d = np.bitwise_count(x[s : s + 2000, None] ^ x[None, :])
            a, b = np.nonzero(d <= radius)
            a = a + s
            keep = a < b
            out.append(np.stack([a[keep], b[keep]], axis=1))
        pairs = np.concatenate(out)
        data_n = sub
    elif method.startswith("faiss"):
        import faiss

        data_n = n if method == "faiss_1M" else sub
        x = h[:data_n].byteswap().view(np.uint8).reshape(-1, 8)  # big-endian bytes = our bit order
        idx = faiss.IndexBinaryMultiHash(64, 4, 16)  # 4 tables x 16 bits, nflip=1: exact for r <= 7
        idx.nflip = 1
        idx.add(x)
        lims, dist, labels = idx.range_search(x, radius + 1)  # faiss keeps distance < radius
        q = np.repeat(np.arange(data_n), np.diff(lims).astype(np.int64))
        keep = q < labels
        pairs = np.stack([q[keep], labels[keep]], axis=1)
    else:
        raise SystemExit(f"unknown method {method}")
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    got = _pairs_set(pairs) if len(pairs) else np.empty(0, np.int64)
    if method == "synsetforge_incremental":
        planted = planted[planted[:, 1] >= n - sub]
    elif data_n < n:
        planted = planted[planted[:, 1] < data_n]
    found = np.isin(_pairs_set(planted), got).mean() if len(planted) else 1.0
    exact = None
    if method in ("synsetforge", "bruteforce_numpy", "faiss_100k", "faiss_1M"):
        sub_pairs = got[(got >> 32) < sub]
        sub_pairs = sub_pairs[(sub_pairs & ((1 << 32) - 1)) < sub]
        exact = int(len(sub_pairs))  # compared with brute force by the parent
    return {"method": method, "n": data_n, "wall_s": wall, "cpu_s": cpu, "pairs": int(len(got)),
            "planted": int(len(planted)), "recall": float(found), "subset_pairs": exact, "plan": plan,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--radius", type=int, default=6)
    ap.add_argument("--method")
    ap.add_argument("--timeout", type=float, default=300.0, help="wall seconds per method before it is stopped")
    ap.add_argument("--methods", default="synsetforge,synsetforge_incremental,bruteforce_numpy,faiss_100k,faiss_1M")
    args = ap.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.n, args.radius)))
        return 0
    rows, unfinished = [], []
    load = os.getloadavg()
    for m in args.methods.split(","):
        cmd = [sys.executable, "-m", "benchmarks.neardup_speed", "--method", m, "--n", str(args.n),
               "--radius", str(args.radius)]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            unfinished.append(f"{m}: stopped after {time.perf_counter() - t0:.0f} s wall (--timeout), unfinished")
            continue
        if r.returncode:
            print(f"{m} failed: {r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    load = tuple(max(a, b) for a, b in zip(load, os.getloadavg(), strict=True))
    base = next((r for r in rows if r["method"] == "synsetforge"), None)
    brute = next((r for r in rows if r["method"] == "bruteforce_numpy"), None)
    print(f"\nAll pairs within Hamming distance {args.radius}, uniform random 64-bit hashes with planted pairs; "
          f"load average (1/5/15 min, max of start and end) {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n")
    print("| method | hashes | wall s | CPU s | peak RSS MB | pairs found | planted found | exact on 100k subset |"
          " CPU vs synsetforge | wall vs synsetforge |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ex = "" if r["subset_pairs"] is None or brute is None else ("yes" if r["subset_pairs"] == brute["pairs"]
                                                                  else f"no ({r['subset_pairs']})")
        cpu_ratio = f"{r['cpu_s'] / base['cpu_s']:.2f}x" if base else ""
        ratio = f"{r['wall_s'] / base['wall_s']:.2f}x" if base else ""
        print(f"| {r['method']} | {r['n']:,} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['pairs']:,} | {100 * r['recall']:.2f} % | {ex} | {cpu_ratio} | {ratio} |")
    for r in rows:
        if r.get("plan"):
            print(f"\n{r['method']}: {r['plan']}")
    for line in unfinished:
        print(f"\n{line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
