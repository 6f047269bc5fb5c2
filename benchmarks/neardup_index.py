"""The near-duplicate index at ImageNet scale: a batch looked up against a persisted index, and the merge per round.

    .venv/bin/python -m benchmarks.neardup_index [--index-hashes 14000000] [--batch 100000] \\
        [--merge-sizes 100000,1000000] [--merge-new 10000] [--rounds 3] [--timeout 900] [--chunks M] [--root DIR]

Lookup: an index of --index-hashes hashes (images x len(HASH_COLUMNS); random base hashes, each window hash 8-16
random bit flips away from its image's base, random thumbnails) is stored the way a rebuild leaves it (the chunking
`stage._index_chunks` gives that many images, or --chunks; segments of at most `stage.INDEX_MAX_MERGE` images; the
bucket directories; .npy files on a local store). In a fresh process the index's files are evicted from the page
cache (posix_fadvise DONTNEED; fincore checks) and the index is loaded from its manifest (every array must be a
np.memmap; HammingIndex._build is counted: the lookup must sort no stored hash) and queried with a --batch image
batch holding 1,000 planted near copies of indexed images (2 bit flips per hash, same thumbnail): recall = planted
(query, source) pairs found. Then the same lookup warm, and what the merge does with the batch
(`NearDupIndex.add_batch`: lookup, the batch's own pairs, its new segment) plus writing that segment.
Today's path for comparison, in the same run: what a merge did before the index was stored
(`dedup.near_duplicate_pairs`: `NearDupIndex.add` over every image, index + batch, with the chunking `_plan` picks
for that size), stopped after --timeout; and the index part of the full rebuild (`ingest --rebuild-index`:
`add_batch` per INDEX_MAX_MERGE images with `_index_chunks`, then the segments written), stopped after 5 x --timeout.

Merge: a store with N existing images (synthetic rows, 2 % of them near copies of others, 1 % more URLs timed
out; candidates over 1,000 synsets; links, near_pairs and the index made by one full merge) gets --rounds rounds of
--merge-new new images rows (2 % exact copies of stored images, half at a smaller URL; 2 % near copies; 3 %
rejected; 1 % retries of stored timeouts that now succeed), each with its candidates. Per round the collect rewrite
of candidates and the shard's part are written by one process (untimed), `merge_ingest` runs timed in a fresh
process (its peak RSS is the merge's), then the round's planted near pairs are looked for in near_pairs.
Every step runs in its own subprocess (peak RSS per step; a memory-mapped index's resident pages count in it, so
anonymous and file-backed RSS are reported too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

N_PLANTED = 1000


def _hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, H) window hashes: a random base per image, window c its base with 6 + 2c random bit flips (8-16)."""
    from pipeline.ingest.fingerprint import HASH_COLUMNS

    base = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    out = np.empty((n, len(HASH_COLUMNS)), np.uint64)
    out[:, 0] = base
    for c in range(1, len(HASH_COLUMNS)):
        flips = np.zeros(n, np.uint64)
        for _ in range(6 + 2 * c):
            flips |= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
        out[:, c] = base ^ flips
    return out


def _thumbs(n: int, rng: np.random.Generator) -> np.ndarray:
    from pipeline.ingest.fingerprint import THUMB_COLUMNS

    return rng.integers(0, 2**64 - 1, (n, len(THUMB_COLUMNS)), dtype=np.uint64, endpoint=True)


def _near(h: np.ndarray, rng: np.random.Generator, bits: int = 2) -> np.ndarray:
    out = h.copy()
    for _ in range(bits):
        out ^= np.uint64(1) << rng.integers(0, 64, out.shape).astype(np.uint64)
    return out


def _frame(ids: list[str], hashes: np.ndarray, thumbs: np.ndarray):
    import pandas as pd

    from pipeline.ingest.fingerprint import HASH_COLUMNS, THUMB_COLUMNS

    cols = {"image_id": ids}
    cols.update({c: hashes[:, i] for i, c in enumerate(HASH_COLUMNS)})
    cols.update({c: thumbs[:, i] for i, c in enumerate(THUMB_COLUMNS)})
    return pd.DataFrame(cols)


def _usage(t0: float, c0: float, **extra) -> dict:
    return {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **extra}


def _index_data(n_hashes: int):
    from pipeline.ingest.fingerprint import HASH_COLUMNS

    n = -(-n_hashes // len(HASH_COLUMNS))
    rng = np.random.default_rng(7)
    return n, _hashes(n, rng), _thumbs(n, rng)


def _batch(index_hashes: np.ndarray, index_thumbs: np.ndarray, size: int):
    rng = np.random.default_rng(8)
    h, t = _hashes(size, rng), _thumbs(size, rng)
    src = rng.choice(len(index_hashes), N_PLANTED, replace=False)
    h[:N_PLANTED], t[:N_PLANTED] = _near(index_hashes[src], rng), index_thumbs[src]
    return h, t, src


def _index_chunks(n_images: int, override: int | None) -> int:
    """The chunking the ingest merge gives a stored index of n_images (stage._index_chunks), unless overridden."""
    from pipeline.ingest import stage

    return override or stage._index_chunks(n_images)


def _sorted_hashes_counter():
    """Count the hashes HammingIndex._build sorts (a lookup that rebuilt the stored index would sort all of them)."""
    from pipeline.ingest.neardup import HammingIndex

    count = {"hashes": 0, "calls": 0}
    orig = HammingIndex._build

    def counted(self, hashes, ids):
        count["hashes"] += int(len(hashes))
        count["calls"] += 1
        return orig(self, hashes, ids)

    HammingIndex._build = counted
    return count


def _proc_rss() -> dict:
    """Current anonymous / file-backed resident memory (a memory-mapped index shows as file-backed)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0].lower() + "_mb"] = round(int(line.split()[1]) / 1024)
    return out


def _evict(root: str) -> dict:
    """Drop this index's files from the page cache (clean pages after the fsync'd write), so the first lookup
    reads them from disk; fincore says how much stayed cached."""
    files = sorted(str(f) for f in Path(root).rglob("*.npy"))
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    cached = 0
    try:
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True,
                           text=True, timeout=60)
        cached = sum(int(x) for x in r.stdout.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        cached = -1
    return {"files": len(files), "cached_mb_after_evict": round(cached / 2**20) if cached >= 0 else None}


def _planted_found(pairs, a: str, b: str, src: np.ndarray) -> int:
    want = {(f"q{i:09d}", f"{s:064x}") for i, s in enumerate(src)}
    got = set(pairs[[a, b]].itertuples(index=False, name=None))
    got |= {(y, x) for x, y in got}
    return len(want & got)


def step_build(root: str, n_hashes: int, batch: int, chunks: int | None) -> dict:
    """The stored index as a rebuild leaves it: stage._index_chunks chunking, segments of at most
    stage.INDEX_MAX_MERGE images; plus the query batch (with its planted copies) saved for the query step."""
    from pipeline.ingest import stage
    from pipeline.ingest.neardup import NearDupIndex, StoredIndex, _id_bytes
    from pipeline.store import LocalStore

    n, h, t = _index_data(n_hashes)
    bh, bt, src = _batch(h, t, batch)
    os.makedirs(root, exist_ok=True)
    np.savez(f"{root}/batch.npz", hashes=bh, thumbs=bt, src=src)
    del bh, bt
    chunks = _index_chunks(n, chunks)
    t0, c0 = time.perf_counter(), time.process_time()
    idx = NearDupIndex(chunks=chunks, max_merge=stage.INDEX_MAX_MERGE)
    step = stage.INDEX_MAX_MERGE
    for i in range(0, n, step):  # sorted only (no self-join: the pairs inside the index are not the question)
        j = min(n, i + step)
        idx.segments.append(idx._segment(_id_bytes([f"{k:064x}" for k in range(i, j)]), h[i:j], t[i:j]))
    built = _usage(t0, c0)
    del h, t
    store = LocalStore(f"{root}/store")
    t0, c0 = time.perf_counter(), time.process_time()
    sidx = StoredIndex(store)
    segments = sidx.write_segments(idx, 1)  # bucket directories computed here
    sidx.commit({"generation": 1, "created_at": datetime.now(UTC).isoformat(), "index": sidx.spec(idx),
                 "segments": segments, "n_images": len(idx), "parts": [], "tables": {}, "synsets": {}})
    size = sum(f.stat().st_size for f in Path(root).rglob("*.npy"))
    return {"step": "build", "images": n, "hashes": n * idx.segments[0].hashes.shape[1],
            "chunks": chunks, "combinations": len(idx._engine.combos), "segments": [len(s) for s in idx.segments],
            "build": built, "write": _usage(t0, c0, gb_on_disk=round(size / 1e9, 2))}


def step_query(root: str, batch: int) -> dict:
    """Load the stored index (memory-mapped) and look the batch up: first with the index's files evicted from
    the page cache (cold), then again (warm); then what the merge does with it, NearDupIndex.add_batch (lookup,
    the batch's own pairs, its new segment) and writing that segment."""
    from pipeline.ingest.neardup import StoredIndex
    from pipeline.store import LocalStore

    z = np.load(f"{root}/batch.npz")
    bh, bt, src = z["hashes"], z["thumbs"], z["src"]
    assert len(bh) == batch, (len(bh), batch)
    frame = _frame([f"q{i:09d}" for i in range(batch)], bh, bt)
    sorted_ = _sorted_hashes_counter()
    evicted = _evict(f"{root}/store")
    out = {"step": "query", "evict": evicted}
    import pipeline.ingest.neardup as nd

    threads = nd.LOOKUP_THREADS
    for phase in ("cold", "warm", "warm_one_thread"):  # the last: the same lookup on one thread, as before threads
        nd.LOOKUP_THREADS = 1 if phase == "warm_one_thread" else threads
        t0, c0 = time.perf_counter(), time.process_time()
        sidx = StoredIndex(LocalStore(f"{root}/store"))
        idx = sidx.load(sidx.latest())
        arrays = [a for s in idx.segments for a in (s.image_ids, s.hashes, s.thumbs, s.index.hashes, s.index.ptr,
                                                      s.index.ids, s.index.values, s.index.dirs)]
        loaded = _usage(t0, c0, memory_mapped=f"{sum(isinstance(a, np.memmap) for a in arrays)}/{len(arrays)} arrays",
                        hashes_sorted=sorted_["hashes"])
        t0, c0 = time.perf_counter(), time.process_time()
        pairs = idx.query(frame)
        queried = _usage(t0, c0, hashes_sorted=sorted_["hashes"], **_proc_rss())
        out[phase] = {"load": loaded, "query": queried, "pairs": len(pairs),
                      "planted_found": _planted_found(pairs, "query_image_id", "reference_image_id", src),
                      "load_plus_query_s": round(loaded["wall_s"] + queried["wall_s"], 2), "threads": nd.LOOKUP_THREADS}
    nd.LOOKUP_THREADS = threads
    before = sorted_["hashes"]
    t0, c0 = time.perf_counter(), time.process_time()
    idx = sidx.load(sidx.latest())
    found, gone = idx.add_batch(frame)
    added = _usage(t0, c0, hashes_sorted=sorted_["hashes"] - before, segments_merged_away=len(gone),
                   segments_after=[len(s) for s in idx.segments], **_proc_rss())
    t0, c0 = time.perf_counter(), time.process_time()
    sidx.write_segments(idx, 2)
    written = _usage(t0, c0)
    out["add_batch"] = {"add": added, "write_new_segment": written, "pairs": len(found),
                        "planted_found": _planted_found(found, "image_id", "other_image_id", src),
                        "total_s": round(added["wall_s"] + written["wall_s"], 2)}
    out["planted"] = len(src)
    return out


def step_today(root: str, n_hashes: int, batch: int, rebuild: bool, chunks: int | None = None) -> dict:
    """Every image (index + batch) indexed from scratch. `rebuild` False: NearDupIndex.add over all of them with
    the chunking picked for that size (the merge before the index was stored: dedup.near_duplicate_pairs); True:
    the index part of `ingest --rebuild-index` (stage._rebuild: stage._index_chunks chunking, add_batch per
    INDEX_MAX_MERGE images, then the segments written)."""
    from pipeline.ingest import stage
    from pipeline.ingest.neardup import NearDupIndex, StoredIndex
    from pipeline.store import LocalStore

    n, h, t = _index_data(n_hashes)
    bh, bt, src = _batch(h, t, batch)
    frame = _frame([f"{i:064x}" for i in range(n)] + [f"q{i:09d}" for i in range(batch)],
                   np.concatenate([h, bh]), np.concatenate([t, bt]))
    del h, t, bh, bt
    t0, c0 = time.perf_counter(), time.process_time()
    if not rebuild:
        idx = NearDupIndex(n_hint=len(frame))
        pairs = idx.add(frame)
        return {"step": "today", **_usage(t0, c0), "chunks": idx.chunks, "pairs": len(pairs),
                "planted_found": _planted_found(pairs, "image_id", "other_image_id", src)}
    idx = NearDupIndex(chunks=_index_chunks(len(frame), chunks), max_merge=stage.INDEX_MAX_MERGE)
    step = stage.INDEX_MAX_MERGE
    found = [idx.add_batch(frame.iloc[i:i + step])[0] for i in range(0, len(frame), step)]
    indexed = _usage(t0, c0)
    pairs = found[0] if len(found) == 1 else __import__("pandas").concat(found, ignore_index=True)
    t0, c0 = time.perf_counter(), time.process_time()
    StoredIndex(LocalStore(f"{root}/rebuild")).write_segments(idx, 1)
    written = _usage(t0, c0)
    shutil.rmtree(f"{root}/rebuild", ignore_errors=True)
    return {"step": "rebuild", "index": indexed, "write": written, "chunks": idx.chunks,
            "segments": [len(s) for s in idx.segments], "pairs": len(pairs),
            "planted_found": _planted_found(pairs, "image_id", "other_image_id", src),
            "wall_s": round(indexed["wall_s"] + written["wall_s"], 2), "peak_rss_mb": written["peak_rss_mb"]}


# --- merge cost -------------------------------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _rows(ids, urls, hashes, thumbs, status, when, reason=None):
    import pandas as pd

    from pipeline.ingest.fingerprint import HASH_COLUMNS, THUMB_COLUMNS
    from pipeline.ingest.stage import IMAGE_COLUMNS

    n = len(urls)
    df = pd.DataFrame({c: pd.Series([None] * n, dtype=object) for c in IMAGE_COLUMNS})
    df["first_url"], df["status"], df["reject_reason"] = urls, status, reason
    df["fetched_at"] = pd.Series([when] * n, dtype="datetime64[us, UTC]") if n else df["fetched_at"]
    if ids is not None:
        df["image_id"] = ids
        for i, c in enumerate(HASH_COLUMNS):
            df[c] = pd.array(hashes[:, i], dtype="UInt64")
        for i, c in enumerate(THUMB_COLUMNS):
            df[c] = pd.array(thumbs[:, i], dtype="UInt64")
        df["width"], df["height"], df["format"], df["n_bytes"] = 500, 375, "jpeg", 100_000
        df["storage_key"] = [f"blobs/{i[:2]}/{i}.jpg" for i in ids]
    for c in HASH_COLUMNS + THUMB_COLUMNS:
        df[c] = pd.array(df[c], dtype="UInt64")
    return df


def _sha(prefix: str, n: int, start: int = 0) -> list[str]:
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(start, start + n)]


def _candidates(urls: list[str], wnids: list[str], start_rank: int = 0):
    import pandas as pd

    return pd.DataFrame({"wnid": wnids, "source": "bench", "query": None, "url": urls, "page_url": None,
                         "title": None, "license": None, "license_url": None, "creator": None,
                         "rank": np.arange(start_rank, start_rank + len(urls)).astype("int32"), "found_at": T0})


def _near_pairs(store) -> set:
    t = store.read_table("near_pairs", columns=["image_id_a", "image_id_b"]).to_pandas()
    return set(t.itertuples(index=False, name=None))


def step_merge_setup(root: str, n_existing: int) -> dict:
    """A store of n_existing images (2 % of them near copies of others, 1 % more URLs timed out), its candidates
    over 1,000 synsets, made by one full merge (links, near_pairs and the stored index); the images' hashes, thumbnails
    and ids saved as .npy for the rounds."""
    import pandas as pd

    from pipeline.ingest import stage
    from pipeline.ingest.neardup import StoredIndex
    from pipeline.store import LocalStore

    rng = np.random.default_rng(n_existing)
    store = LocalStore(f"{root}/store")
    n_timeout = n_existing // 100
    ids = _sha("img", n_existing)
    urls = [f"http://h{i % 997}.example/p/{i:09d}.jpg" for i in range(n_existing)]
    h, t = _hashes(n_existing, rng), _thumbs(n_existing, rng)
    k_near = n_existing // 50
    dup = rng.choice(n_existing, 2 * k_near, replace=False)
    h[dup[:k_near]], t[dup[:k_near]] = _near(h[dup[k_near:]], rng), t[dup[k_near:]]
    bad = [f"http://h{i % 997}.example/t/{i:09d}.jpg" for i in range(n_timeout)]
    wn = [f"n{i % 1000:08d}" for i in range(n_existing)]
    parts = pd.concat([_rows(ids, urls, h, t, "accepted", T0), _rows(None, bad, None, None, "rejected", T0, "timeout")])
    store.write_table("images", parts, key=f"{stage.PARTS_PREFIX}setup-00000000-00000.parquet")
    store.write_table("candidates", _candidates(urls + bad, wn + [f"n{i % 1000:08d}" for i in range(n_timeout)]))
    os.makedirs(f"{root}/state", exist_ok=True)
    np.save(f"{root}/state/hashes.npy", h)
    np.save(f"{root}/state/thumbs.npy", t)
    np.save(f"{root}/state/ids.npy", np.array(ids, dtype="S64"))
    t0, c0 = time.perf_counter(), time.process_time()
    setup = stage.merge_ingest(store)
    cost = _usage(t0, c0, chunks=StoredIndex(store).latest()["index"]["chunks"], rebuilt=setup["rebuilt"])
    want = {tuple(sorted((ids[a], ids[b]))) for a, b in zip(dup[:k_near], dup[k_near:], strict=True)}
    return {"step": "merge_setup", "existing": n_existing, **cost,
            "planted_near_found": f"{len(want & _near_pairs(store))}/{len(want)}",
            "summary": {k: setup[k] for k in ("images_rows", "near_pairs", "links")},
            "index": StoredIndex(store).latest()["segments"]}


def step_merge_prepare(root: str, n_existing: int, n_new: int, r: int) -> dict:
    """Round r's work, untimed: the collect step rewrites candidates (new URLs over random synsets) and an ingest
    shard leaves its part and note: n_new images rows, 2 % exact copies of stored images (half at a smaller URL),
    2 % near copies (2 bits per hash, same thumbnail), 3 % rejected, 1 % retries of stored timeouts that now
    succeed; the planted near pairs are saved for the round's check."""
    import pandas as pd

    from pipeline.ingest import stage
    from pipeline.store import LocalStore

    rng = np.random.default_rng([n_existing, r])
    store = LocalStore(f"{root}/store")
    h = np.load(f"{root}/state/hashes.npy", mmap_mode="r")
    t = np.load(f"{root}/state/thumbs.npy", mmap_mode="r")
    ids = np.load(f"{root}/state/ids.npy", mmap_mode="r")
    bad = [f"http://h{i % 997}.example/t/{i:09d}.jpg" for i in range(n_existing // 100)]
    when = T0 + timedelta(days=r + 1)
    k_exact, k_near, k_rej, k_retry = n_new // 50, n_new // 50, 3 * n_new // 100, n_new // 100
    k_fresh = n_new - k_exact - k_near - k_rej - k_retry
    nid = _sha(f"new{r}-", k_fresh + k_near + k_retry)
    fresh_h, fresh_t = _hashes(len(nid), rng), _thumbs(len(nid), rng)
    src = rng.choice(n_existing, k_exact + k_near, replace=False)
    fresh_h[k_fresh:k_fresh + k_near] = _near(h[src[k_exact:]], rng)
    fresh_t[k_fresh:k_fresh + k_near] = t[src[k_exact:]]
    exact_ids = [x.decode() for x in ids[src[:k_exact]].tolist()]
    new_urls = [f"http://n{r}.example/{i:07d}.jpg" for i in range(k_fresh + k_near)]
    exact_urls = [f"http://{'a' if i % 2 else 'z'}{r}.example/copy-{i:07d}.jpg" for i in range(k_exact)]
    retry_urls = bad[r * k_retry:(r + 1) * k_retry]
    rej_urls = [f"http://n{r}.example/gone-{i:07d}.jpg" for i in range(k_rej)]
    batch = pd.concat([
        _rows(nid[:k_fresh + k_near], new_urls, fresh_h[:k_fresh + k_near], fresh_t[:k_fresh + k_near], "accepted", when),
        _rows(exact_ids, exact_urls, np.asarray(h[src[:k_exact]]), np.asarray(t[src[:k_exact]]), "accepted", when),
        _rows(nid[k_fresh + k_near:], retry_urls, fresh_h[k_fresh + k_near:], fresh_t[k_fresh + k_near:], "accepted",
              when),
        _rows(None, rej_urls, None, None, "rejected", when, "http_404")], ignore_index=True)
    added = new_urls + exact_urls + rej_urls
    cands = store.read_table("candidates").to_pandas()
    cands = pd.concat([cands, _candidates(added, [f"n{int(x):08d}" for x in rng.integers(0, 1000, len(added))],
                                          start_rank=len(cands))], ignore_index=True)
    store.write_table("candidates", cands)
    version = store.table_version("candidates")
    store.put(f"{stage.PARTS_PREFIX}round{r}-00000000.json", json.dumps(
        {"wnids": sorted(set(cands["wnid"])), "candidates_version": version, "seeds": []}).encode())
    store.write_table("images", batch, key=f"{stage.PARTS_PREFIX}round{r}-00000000-00000.parquet")
    near_src = [x.decode() for x in ids[src[k_exact:]].tolist()]
    want = sorted(tuple(sorted(p)) for p in zip(nid[k_fresh:k_fresh + k_near], near_src, strict=True))
    Path(f"{root}/state/want{r}.json").write_text(json.dumps(want))
    return {"step": "merge_prepare", "round": r, "rows": len(batch)}


def step_merge_round(root: str, r: int) -> dict:
    """One incremental merge, timed, in a process of its own (its peak RSS is the merge's); then its pairs checked."""
    from pipeline.ingest import stage
    from pipeline.store import LocalStore

    store = LocalStore(f"{root}/store")
    t0, c0 = time.perf_counter(), time.process_time()
    summary = stage.merge_ingest(store)
    cost = _usage(t0, c0, **{k: summary[k] for k in ("images_rows", "status_changes", "near_pairs", "links",
                                                      "affected_images", "collapsed", "rebuilt")},
                  index_segments=summary["index"]["segments"])
    want = {tuple(p) for p in json.loads(Path(f"{root}/state/want{r}.json").read_text())}
    return {"step": "merge_round", "round": r, **cost, "planted_near_found": f"{len(want & _near_pairs(store))}/{len(want)}"}


# --- driver -------------------------------------------------------------------------------------------------------


def _run(args: list[str], timeout: float) -> dict | str:
    cmd = [sys.executable, "-m", "benchmarks.neardup_index", *args]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"stopped after {time.perf_counter() - t0:.0f} s wall (--timeout), unfinished"
    if r.returncode:
        return f"failed: {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index-hashes", type=int, default=14_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--merge-sizes", default="100000,1000000")
    ap.add_argument("--merge-new", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="wall seconds for today's path before it is stopped")
    ap.add_argument("--root", default="/tmp/synsetforge-neardup-index")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: lookup,today,rebuild,merge")
    ap.add_argument("--chunks", type=int, help="force the stored index's chunking (default: stage._index_chunks)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        if args.step == "build":
            out = step_build(args.root, args.index_hashes, args.batch, args.chunks)
        elif args.step == "query":
            out = step_query(args.root, args.batch)
        elif args.step in ("today", "rebuild"):
            out = step_today(args.root, args.index_hashes, args.batch, args.step == "rebuild", args.chunks)
        elif args.step == "merge_setup":
            out = step_merge_setup(args.root, args.size)
        elif args.step == "merge_prepare":
            out = step_merge_prepare(args.root, args.size, args.merge_new, args.round)
        else:
            out = step_merge_round(args.root, args.round)
        print(json.dumps(out))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    common = ["--index-hashes", str(args.index_hashes), "--batch", str(args.batch)]
    if args.chunks:
        common += ["--chunks", str(args.chunks)]
    load = os.getloadavg()
    started = time.perf_counter()
    results: dict = {}
    if "lookup" not in skip:
        shutil.rmtree(f"{args.root}/index", ignore_errors=True)
        results["build"] = _run(["--step", "build", *common, "--root", f"{args.root}/index"], 3 * args.timeout)
        if isinstance(results["build"], dict):
            results["query"] = _run(["--step", "query", *common, "--root", f"{args.root}/index"], 3 * args.timeout)
        shutil.rmtree(f"{args.root}/index", ignore_errors=True)
    for step, limit in (("today", args.timeout), ("rebuild", 5 * args.timeout)):
        if step not in skip:
            results[step] = _run(["--step", step, *common, "--root", args.root], limit)
    if "merge" not in skip:
        for size in (int(s) for s in args.merge_sizes.split(",")):
            shutil.rmtree(f"{args.root}/merge{size}", ignore_errors=True)
            where = ["--size", str(size), "--merge-new", str(args.merge_new), "--root", f"{args.root}/merge{size}"]
            res = {"existing": size, "new": args.merge_new, "setup": _run(["--step", "merge_setup", *where],
                                                                          6 * args.timeout), "rounds": []}
            for r in range(args.rounds if isinstance(res["setup"], dict) else 0):
                prep = _run(["--step", "merge_prepare", *where, "--round", str(r)], 6 * args.timeout)
                got = _run(["--step", "merge_round", *where, "--round", str(r)], 6 * args.timeout) if isinstance(
                    prep, dict) else f"prepare {prep}"
                if not isinstance(got, dict):
                    res["error"] = got
                    break
                res["rounds"].append(got)
            results[f"merge{size}"] = res
            shutil.rmtree(f"{args.root}/merge{size}", ignore_errors=True)
    load = tuple(max(a, b) for a, b in zip(load, os.getloadavg(), strict=True))
    print(json.dumps(results, indent=1))
    print(f"\nload average (1/5/15 min, max of start and end) {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
          f"whole run {time.perf_counter() - started:.0f} s")
    b, q = results.get("build"), results.get("query")
    if isinstance(b, dict) and isinstance(q, dict):
        print(f"stored index: {b['hashes']:,} hashes ({b['images']:,} images, segments {b['segments']}, chunks "
              f"{b['chunks']} = {b['combinations']} combinations, {b['write']['gb_on_disk']} GB), built (sorted) in "
              f"{b['build']['wall_s']} s + written in {b['write']['wall_s']} s")
        for phase in ("cold", "warm", "warm_one_thread"):
            x = q[phase]
            print(f"lookup {phase} ({x['threads']} thread(s)): {args.batch:,} images: load {x['load']['wall_s']} s ({x['load']['memory_mapped']} "
                  f"memory-mapped) + query {x['query']['wall_s']} s wall ({x['query']['cpu_s']} CPU s) = "
                  f"{x['load_plus_query_s']} s; planted copies found {x['planted_found']}/{q['planted']}; hashes "
                  f"sorted {x['query']['hashes_sorted']:,}; peak RSS {x['query']['peak_rss_mb']} MB (anon "
                  f"{x['query']['rssanon_mb']}, file {x['query']['rssfile_mb']})")
        a = q["add_batch"]
        print(f"merge's index step (add_batch + write the new segment): {a['add']['wall_s']} + "
              f"{a['write_new_segment']['wall_s']} s; hashes sorted {a['add']['hashes_sorted']:,}; planted found "
              f"{a['planted_found']}/{q['planted']}")
    elif b is not None:
        print(f"build: {b}" if isinstance(b, str) else "", f"query: {q}")
    for step in ("today", "rebuild"):
        if step in results:
            r = results[step]
            print(f"{step}: " + (r if isinstance(r, str) else f"{r['wall_s']} s wall, {r['peak_rss_mb']} MB, chunks "
                                 f"{r['chunks']}, planted found {r['planted_found']}"))
    means = {}
    for key, r in results.items():
        if key.startswith("merge") and r["rounds"]:
            walls = [x["wall_s"] for x in r["rounds"]]
            means[r["existing"]] = float(np.mean(walls))
            print(f"merge of {r['new']:,} new rows into {r['existing']:,} images: per round {walls} s wall "
                  f"(mean {np.mean(walls):.2f}), CPU {[x['cpu_s'] for x in r['rounds']]}, planted near copies found "
                  f"{[x['planted_near_found'] for x in r['rounds']]}, peak RSS {[x['peak_rss_mb'] for x in r['rounds']]} "
                  f"MB; setup (full merge) {r['setup']['wall_s']} s, {r['setup']['peak_rss_mb']} MB, planted near "
                  f"copies found {r['setup']['planted_near_found']}")
        elif key.startswith("merge"):
            print(f"{key}: {r.get('error') or r['setup']}")
    if len(means) >= 2:
        small, big = min(means), max(means)
        print(f"merge cost ratio {big:,} vs {small:,} existing images: {means[big] / means[small]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
