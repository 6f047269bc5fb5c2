"""ImageNet-scale working tables: appending 1,000 votes and reading a few synsets, old single-object Parquet
against Delta working tables, in the same run.

    .venv/bin/python benchmarks/scale.py                  # 1M and 12.8M votes (ILSVRC-2012 size)
    .venv/bin/python benchmarks/scale.py --sizes 1000000  # quicker

A votes table of N votes over 1.28M images (sha256 ids), 1,000 synsets and 25.6k workers (10 votes per image
at 12.8M) is generated in a temp store twice: as `tables/votes.parquet` written the way the store wrote
every table before working tables were Delta (validate, one Parquet object, one put), and as the Delta table
`tables/votes/` (rows in synset order, the layout `synsetforge store compact votes --order-by wnid` leaves).
Then each operation runs in a fresh process that reports its time (imports excluded) and its peak RSS:

- old append: read the whole object, concatenate 1,000 votes, rewrite it (what `write_table` did per pull);
- append_table of 1,000 votes, plain and with `unique_by=["annotation_id", "image_id"]` (what pull does);
- reading the votes of 10 synsets: old (read everything, then filter), Delta with a filter, Delta everything.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.schemas import validate  # noqa: E402
from pipeline.store import LocalStore, table_key  # noqa: E402

N_IMAGES, N_SYNSETS, N_WORKERS = 1_281_167, 1_000, 25_600


def wnids() -> pa.Array:
    return pa.array([f"n{10_000_000 + 7919 * i:08d}" for i in range(N_SYNSETS)])


def votes(n: int, start_id: int, seed: int) -> pa.Table:
    """n votes with annotation ids start_id.., images drawn from 1.28M, each image in one synset."""
    rng = np.random.default_rng(seed)
    n_images = min(N_IMAGES, max(1, n // 10))
    image = rng.integers(0, n_images, n)
    ids = pa.array([f"{(i * 0x9E3779B97F4A7C15) % (1 << 64):016x}" * 4 for i in range(n_images)])
    return validate("votes", pa.table({
        "annotation_id": pa.array(np.arange(start_id, start_id + n, dtype=np.int64)),
        "task_id": pa.array(image.astype(np.int64)),
        "image_id": pc.take(ids, pa.array(image)),
        "wnid": pc.take(wnids(), pa.array(image % N_SYNSETS)),
        "worker": pc.take(pa.array([f"w-{j:012x}" for j in range(N_WORKERS)]), pa.array(rng.integers(0, N_WORKERS, n))),
        "answer": pc.take(pa.array(["no", "yes"]), pa.array(rng.integers(0, 2, n))),
        "is_gold": pa.array(rng.random(n) < 0.05),
        "lead_time_s": pa.array(rng.gamma(2.0, 2.0, n)),
        "submitted_at": pa.array(1_750_000_000_000_000 + np.arange(n, dtype=np.int64) * 1000, pa.timestamp("us", tz="UTC")),
    }))


# -- the store's table path before working tables were Delta (the code at the parent of this change) -------
def old_write_table(store: LocalStore, name: str, data: pa.Table) -> None:
    table = validate(name, data)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    store.put(table_key(name), sink.getvalue().to_pybytes())


def old_read_table(store: LocalStore, name: str) -> pa.Table:
    return validate(name, pq.read_table(io.BytesIO(store.get(table_key(name)))))


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage: Linux keeps ru_maxrss across exec, so a child started
    by the generating parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one measured operation per process ------------------------------------------------------------------------
def child(op: str, root: str, n: int, rep: int) -> None:
    store = LocalStore(root)
    ten = wnids().to_pylist()[::100]  # 10 synsets spread over the table
    new = votes(1_000, n + 1_000 * rep, seed=100 + rep) if op.startswith("append") else None
    t0 = time.perf_counter()
    if op == "append-old":
        old_write_table(store, "votes", pa.concat_tables([old_read_table(store, "votes"), new]))
    elif op == "append-delta":
        store.append_table("votes", new)
    elif op == "append-delta-unique":
        store.append_table("votes", new, unique_by=["annotation_id", "image_id"])
    elif op == "read10-old":
        t = old_read_table(store, "votes")
        rows = t.filter(pc.is_in(t["wnid"], pa.array(ten))).num_rows
    elif op == "read10-delta":
        rows = store.read_table("votes", filter=[("wnid", "in", ten)]).num_rows
    elif op == "readall-delta":
        rows = store.read_table("votes").num_rows
    elif op == "readall-old":
        rows = old_read_table(store, "votes").num_rows
    seconds = time.perf_counter() - t0
    out = {"op": op, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if op.startswith("read"):
        out["rows"] = rows
    print(json.dumps(out))


def run(op: str, root: Path, n: int, rep: int = 0) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", op, str(root), str(n), str(rep)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(n: int, tmp: Path, repeats: int) -> list[dict]:
    t0 = time.perf_counter()
    table = votes(n, 0, seed=1)
    gen_s = time.perf_counter() - t0
    old_root, new_root = tmp / f"old-{n}", tmp / f"delta-{n}"
    old_store = LocalStore(old_root)
    t0 = time.perf_counter()
    old_write_table(old_store, "votes", table)
    old_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    LocalStore(new_root).write_table("votes", table.sort_by([("wnid", "ascending"), ("annotation_id", "ascending")]))
    delta_s = time.perf_counter() - t0
    del table
    size = lambda root: sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6  # noqa: E731
    print(f"{n:,} votes: generated in {gen_s:.1f}s; old object written in {old_s:.1f}s ({size(old_root):.0f} MB), "
          f"Delta table in {delta_s:.1f}s ({size(new_root):.0f} MB)", flush=True)
    rows = []
    for op, root, reps in [("append-old", old_root, max(1, repeats // 3)), ("append-delta", new_root, repeats),
                           ("append-delta-unique", new_root, repeats), ("read10-old", old_root, 1),
                           ("read10-delta", new_root, 3), ("readall-old", old_root, 1), ("readall-delta", new_root, 1)]:
        base = {"append-delta-unique": 100}.get(op, 0)
        results = [run(op, root, n, base + r) for r in range(reps)]
        row = {"votes": n, "op": op, "runs": reps, "median_s": statistics.median(r["seconds"] for r in results),
               "max_s": max(r["seconds"] for r in results), "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
               "rows": results[0].get("rows")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,12800000", help="comma-separated vote counts")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each Delta append (old append: a third)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sf-scale-") as tmp:
        rows = [r for n in map(int, args.sizes.split(",")) for r in bench(n, Path(tmp), args.repeats)]
    print("\n| votes | operation | runs | median s | max s | peak RSS MB | rows |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['votes']:,} | {r['op']} | {r['runs']} | {r['median_s']:.3f} | {r['max_s']:.3f} | "
              f"{r['peak_rss_mb']:.0f} | {'' if r['rows'] is None else format(r['rows'], ',')} |")


if __name__ == "__main__":
    main()
