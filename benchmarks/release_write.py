"""Release write/read benchmark: build a synthetic release of 1,300,000 images (1,000 classes, boxes on 30 %)
and read it back, against a plain pyarrow write + read of the same input tables, in the same run.

    .venv/bin/python benchmarks/release_write.py                 # full size
    .venv/bin/python benchmarks/release_write.py --images 100000 # quick

Every measured phase runs in a fresh subprocess, so peak RSS (ru_maxrss) is that phase's own; every child
imports the same modules (pyarrow, pandas, pipeline.release) before its clock starts, so the RSS baseline of
the interpreter is the same on both sides and time excludes imports. Phases:
- synsetforge write: `build_release` (read the store's synsets/images/labels/boxes, choose splits by quota,
  filter, validate, write content-addressed Parquet + sha256 + fsync, manifest last with an exclusive put;
  the Parquet encoding, hashing and fsync of one table run on a second thread while the next table is read);
- synsetforge read: `read_release_table` for the four tables (schema-validated);
- pyarrow write: `pq.read_table` of the same four input files + `pq.write_table` (zstd) of each;
- pyarrow read: `pq.read_table` of the four written files.
The near-duplicate check is off in the compared run (it is a search, not a write; pass --neardup to add a
row with it on). Each phase runs --repeat times (default 3, interleaved); the table shows the fastest time (with
that run's CPU time, user + system over all threads, so work moved to a second thread is still counted) and the
highest peak RSS of each. Both sides write zstd at pyarrow's default level and row group size. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TABLES = ("synsets", "images", "labels", "boxes")


def generate(store_dir: Path, n_images: int, n_classes: int, box_share: float, seed: int = 0) -> dict:
    """Input tables in a LocalStore, vectorised (no image blobs: the release never reads them)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.release.synthetic import fill_schema, synthetic_wnids
    from pipeline.store import LocalStore

    rng = np.random.default_rng(seed)
    store = LocalStore(store_dir)
    wnids = np.array(synthetic_wnids(n_classes))
    store.write_table("synsets", fill_schema("synsets", {
        "wnid": wnids.tolist(), "name": [f"c{i}.n.01" for i in range(n_classes)],
        "lemmas": [[f"class {i}"] for i in range(n_classes)], "gloss": ["synthetic"] * n_classes,
        "depth": [8] * n_classes, "parent_wnids": [["n90000000"]] * n_classes, "lexname": ["noun.artifact"] * n_classes,
        "is_leaf": [True] * n_classes, "queries": [[f"class {i}"] for i in range(n_classes)]}, n_classes))

    ids = np.array([hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(n_images)], dtype=object)
    n_rej = n_images // 50  # 2 % failed downloads on top
    u64 = lambda n: pa.array(rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)  # noqa: E731
                             + rng.integers(0, 2, n, dtype=np.int64).astype(np.uint64))
    n_all = n_images + n_rej
    img_ids = np.concatenate([ids, np.array([None] * n_rej, dtype=object)])
    status = np.array(["accepted"] * n_images + ["rejected"] * n_rej, dtype=object)
    cols = {
        "image_id": pa.array(img_ids, pa.string()),
        "width": pa.array(np.concatenate([rng.integers(200, 1200, n_images), np.zeros(n_rej, int)]), pa.int32()),
        "height": pa.array(np.concatenate([rng.integers(200, 1200, n_images), np.zeros(n_rej, int)]), pa.int32()),
        "format": pa.array(np.full(n_all, "JPEG", dtype=object), pa.string()),
        "n_bytes": pa.array(rng.integers(20_000, 400_000, n_all), pa.int64()),
        "storage_key": pa.array([f"blobs/{i[:2]}/{i}.jpg" for i in ids] + [None] * n_rej, pa.string()),
        "first_url": pa.array([f"https://img.example.test/p/{k}.jpg" for k in range(n_all)], pa.string()),
        "status": pa.array(status, pa.string()),
        "reject_reason": pa.array([None] * n_images + ["http_404"] * n_rej, pa.string()),
    }
    from pipeline.schemas import arrow_schema

    for f in arrow_schema("images"):
        if f.name not in cols and f.type == pa.uint64():
            cols[f.name] = u64(n_all)
    store.write_table("images", fill_schema("images", cols, n_all))

    cls = rng.integers(0, n_classes, n_images)
    conf = rng.uniform(0.95, 1.0, n_images)
    n_extra = n_images // 100  # 1 % of images carry a second (rejected) label
    extra = rng.choice(n_images, n_extra, replace=False)
    lab_ids = np.concatenate([ids, ids[extra]])
    store.write_table("labels", fill_schema("labels", {
        "image_id": pa.array(lab_ids, pa.string()),
        "wnid": pa.array(np.concatenate([wnids[cls], wnids[(cls[extra] + 1) % n_classes]]), pa.string()),
        "status": pa.array(np.array(["accepted"] * n_images + ["rejected"] * n_extra, dtype=object), pa.string()),
        "n_votes": pa.array(rng.integers(3, 11, n_images + n_extra), pa.int32()),
        "n_yes": pa.array(rng.integers(3, 11, n_images + n_extra), pa.int32()),
        "confidence": pa.array(np.concatenate([conf, rng.uniform(0, 0.05, n_extra)])),
        "method": pa.array(np.full(n_images + n_extra, "confidence_table", dtype=object), pa.string()),
    }, n_images + n_extra))

    boxed = np.sort(rng.choice(n_images, int(n_images * box_share), replace=False))
    per = rng.integers(1, 3, len(boxed))
    bi = np.repeat(boxed, per)
    seq = np.concatenate([np.arange(k) for k in per]) if len(per) else np.array([], int)
    x0, y0 = rng.uniform(0, 100, len(bi)), rng.uniform(0, 100, len(bi))
    store.write_table("boxes", fill_schema("boxes", {
        "box_id": pa.array([f"{ids[i][:20]}-{s}" for i, s in zip(bi, seq, strict=True)], pa.string()),
        "image_id": pa.array(ids[bi], pa.string()), "wnid": pa.array(wnids[cls[bi]], pa.string()),
        "x_min": pa.array(x0), "y_min": pa.array(y0), "x_max": pa.array(x0 + rng.uniform(20, 100, len(bi))),
        "y_max": pa.array(y0 + rng.uniform(20, 100, len(bi))),
        "verified": pa.array(np.where(rng.random(len(bi)) < 0.9, "accepted", "rejected").astype(object), pa.string()),
        "drawn_by": pa.array(np.full(len(bi), "w1", dtype=object), pa.string()),
        "seq": pa.array(seq, pa.int32()), "n_drawn": pa.array(np.ones(len(bi), int), pa.int32()),
        "n_votes": pa.array(np.full(len(bi), 3), pa.int32()), "n_yes": pa.array(np.full(len(bi), 3), pa.int32()),
    }, len(bi)))
    return {"images": n_all, "labels": n_images + n_extra, "boxes": int(len(bi))}


def phase(name: str, store_dir: Path, out_dir: Path, neardup: bool) -> dict:
    # imports first, outside the timed part, for both sides (pandas costs ~1 s to import on this machine)
    import jsonschema  # noqa: F401  (manifest validation)
    import pyarrow.parquet as pq

    from pipeline.release.build import build_release
    from pipeline.release.manifest import read_release_table
    from pipeline.store import LocalStore

    if neardup and name == "ours_write":
        import pipeline.ingest.neardup  # noqa: F401

    t0, c0 = time.perf_counter(), time.process_time()
    info: dict = {}
    if name == "ours_write":
        m = build_release(LocalStore(store_dir), "bench", val_per_class=50, test_per_class=100, neardup=neardup)
        info = {"rows": {k: v["rows"] for k, v in m["files"].items()}, "splits": m["splits"],
                "bytes": sum(v["n_bytes"] for v in m["files"].values()), "neardup_dropped": m["neardup_dropped"]}
    elif name == "ours_read":
        store = LocalStore(store_dir)
        info = {"rows": sum(read_release_table(store, "bench", t).num_rows for t in TABLES)}
    elif name == "plain_write":
        out_dir.mkdir(parents=True, exist_ok=True)
        size = 0
        for t in TABLES:
            table = pq.read_table(store_dir / "tables" / f"{t}.parquet")
            pq.write_table(table, out_dir / f"{t}.parquet", compression="zstd")
            size += (out_dir / f"{t}.parquet").stat().st_size
            del table
        info = {"bytes": size}
    elif name == "plain_read":
        info = {"rows": sum(pq.read_table(out_dir / f"{t}.parquet").num_rows for t in TABLES)}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"phase": name, "seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_300_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--box-share", type=float, default=0.3)
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".cache" / "release_write"))
    ap.add_argument("--neardup", action="store_true", help="also time a build with the near-duplicate check")
    ap.add_argument("--repeat", type=int, default=3, help="runs per phase; the fastest time and highest RSS are kept")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--no-neardup-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    store_dir, out_dir = work / "store", work / "plain"
    if args.child == "generate":
        print(json.dumps(generate(store_dir, args.images, args.classes, args.box_share)))
        return 0
    if args.child:
        print(json.dumps(phase(args.child, store_dir, out_dir, neardup=not args.no_neardup_child)))
        return 0

    shutil.rmtree(work, ignore_errors=True)
    common = ["--images", str(args.images), "--classes", str(args.classes), "--workdir", str(work)]
    t0 = time.perf_counter()
    sizes = run_child("--child", "generate", "--box-share", str(args.box_share), *common)
    gen_s = time.perf_counter() - t0
    res = {}
    for _ in range(args.repeat):  # interleaved repeats; the machine is shared, so keep the fastest of each
        for name in ("plain_write", "plain_read", "ours_write", "ours_read"):
            if name == "ours_write":
                shutil.rmtree(store_dir / "releases", ignore_errors=True)
            r = run_child("--child", name, "--no-neardup-child", *common)
            if name not in res or r["seconds"] < res[name]["seconds"]:
                res[name] = {**r, "peak_rss_mb": max(r["peak_rss_mb"], res.get(name, r)["peak_rss_mb"])}
            else:
                res[name]["peak_rss_mb"] = max(res[name]["peak_rss_mb"], r["peak_rss_mb"])
    if args.neardup:
        shutil.rmtree(store_dir / "releases", ignore_errors=True)
        res["ours_write_neardup"] = run_child("--child", "ours_write", *common)

    print(f"\n{args.repeat} run(s) per phase. Input: {sizes['images']:,} image rows ({args.images:,} accepted), {sizes['labels']:,} label rows, "
          f"{sizes['boxes']:,} boxes, {args.classes} classes (generated in {gen_s:.1f} s). "
          f"Release: {res['ours_write']['splits']}, {res['ours_write']['bytes'] / 1e6:.1f} MB Parquet; "
          f"plain copy {res['plain_write']['bytes'] / 1e6:.1f} MB.\n")
    print("| step | synsetforge s | pyarrow s | time ratio | synsetforge CPU s | pyarrow CPU s | CPU ratio "
          "| synsetforge peak RSS MB | pyarrow peak RSS MB | RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for step, a, b in (("write", "ours_write", "plain_write"), ("read back", "ours_read", "plain_read")):
        ra, rb = res[a], res[b]
        print(f"| {step} | {ra['seconds']:.2f} | {rb['seconds']:.2f} | {ra['seconds'] / rb['seconds']:.2f}x | "
              f"{ra['cpu_seconds']:.2f} | {rb['cpu_seconds']:.2f} | {ra['cpu_seconds'] / rb['cpu_seconds']:.2f}x | "
              f"{ra['peak_rss_mb']:.0f} | {rb['peak_rss_mb']:.0f} | {ra['peak_rss_mb'] / rb['peak_rss_mb']:.2f}x |")
    tot_a = res["ours_write"]["seconds"] + res["ours_read"]["seconds"]
    tot_b = res["plain_write"]["seconds"] + res["plain_read"]["seconds"]
    print(f"| write + read | {tot_a:.2f} | {tot_b:.2f} | {tot_a / tot_b:.2f}x | | | | | | |")
    if "ours_write_neardup" in res:
        r = res["ours_write_neardup"]
        print(f"| write with near-dup check | {r['seconds']:.2f} | | | {r['cpu_seconds']:.2f} | | | "
              f"{r['peak_rss_mb']:.0f} | | ({r['neardup_dropped']} dropped) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
