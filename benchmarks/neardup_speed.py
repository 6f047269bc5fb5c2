"""Candidate search speed: every pair within Hamming distance r among 1,000,000 64-bit hashes, exactly.

    .venv/bin/python -m benchmarks.neardup_speed [--n 1000000] [--radius 6] [--timeout 300]

Each method runs in its own subprocess (peak RSS measured per method). Random uniform hashes with planted pairs
at distances 0..r; "recall" = share of planted pairs found; exactness is checked against brute force on the
100,000 subset. Peers in the same run: brute-force numpy (100,000 subset) and faiss IndexBinaryMultiHash.
A method still running after --timeout wall seconds is stopped and reported as unfinished.

Image level (`images_4_hashes`, `images_6_hashes`): NearDupIndex.add (candidate search + thumbnail verification)
over n / 4 images, i.e. the images whose four hashes made 1,000,000 hashes before the two shifted windows were
added, once with those four hash columns and once with today's six (same engine, same images, same run). Each
image's window hashes are its base hash with 8-18 random bits flipped, as the windows of one photo are close.
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
    if method.startswith("images_"):
        return run_images(method, n, radius)
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


def run_images(method: str, n: int, radius: int) -> dict:
    import pandas as pd

    import pipeline.ingest.fingerprint as fp
    import pipeline.ingest.neardup as nd

    k = int(method.split("_")[1])
    cols = fp.HASH_COLUMNS[:k]
    nd.HASH_COLUMNS = cols  # the engine reads the hash columns from here: run it with the first k of them
    nd.HASH_PAIRS = tuple(row[:k] for row in fp.HASH_PAIRS[:k])
    n_img = n // 4
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**64 - 1, n_img, dtype=np.uint64, endpoint=True)
    frame: dict = {"image_id": [f"img{i:08d}" for i in range(n_img)]}
    for i, c in enumerate(fp.HASH_COLUMNS):
        flips = np.zeros(n_img, np.uint64)
        for _ in range(0 if i == 0 else 8 + 2 * i):
            flips |= np.uint64(1) << rng.integers(0, 64, n_img).astype(np.uint64)
        frame[c] = base ^ flips
    for c in fp.THUMB_COLUMNS:
        frame[c] = rng.integers(0, 2**64 - 1, n_img, dtype=np.uint64, endpoint=True)
    chosen = rng.choice(n_img, 4000, replace=False)  # 2,000 near copies of 2,000 other images
    planted, src = chosen[:2000], chosen[2000:]
    for c in (*fp.HASH_COLUMNS, *fp.THUMB_COLUMNS):
        frame[c][planted] = frame[c][src]
    for c in fp.HASH_COLUMNS:
        for _ in range(radius // 2):
            frame[c][planted] ^= np.uint64(1) << rng.integers(0, 64, len(planted)).astype(np.uint64)
    df = pd.DataFrame(frame)
    t0, cpu0 = time.perf_counter(), time.process_time()
    pairs = nd.NearDupIndex(radius, n_hint=n_img).add(df)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    got = {tuple(sorted(p)) for p in pairs[["image_id", "other_image_id"]].itertuples(index=False, name=None)}
    want = {tuple(sorted((f"img{a:08d}", f"img{b:08d}"))) for a, b in zip(planted, src, strict=True)}
    return {"method": method, "n": n_img * k, "wall_s": wall, "cpu_s": cpu, "pairs": len(got),
            "planted": len(want), "recall": len(want & got) / len(want), "subset_pairs": None,
            "plan": f"{n_img:,} images x {k} hash columns ({', '.join(cols)})",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--radius", type=int, default=6)
    ap.add_argument("--method")
    ap.add_argument("--timeout", type=float, default=300.0, help="wall seconds per method before it is stopped")
    ap.add_argument("--methods", default="synsetforge,synsetforge_incremental,images_4_hashes,images_6_hashes,"
                                         "bruteforce_numpy,faiss_100k,faiss_1M")
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
    img = {r["method"]: r for r in rows if r["method"].startswith("images_")}
    if {"images_4_hashes", "images_6_hashes"} <= set(img):
        a, b = img["images_4_hashes"], img["images_6_hashes"]
        print(f"\nimage level, six hash columns vs four (same images): {b['cpu_s'] / a['cpu_s']:.2f}x CPU, "
              f"{b['wall_s'] / a['wall_s']:.2f}x wall")
    for line in unfinished:
        print(f"\n{line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
