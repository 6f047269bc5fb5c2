"""QC rounds at ILSVRC-2012 scale (issue 18): one crowd-loop round, a 1,000-vote append, full refits, and the
pre-rounds QC (the whole votes frame through the pure `aggregate`) as the baseline, in the same run.

    # the issue's targets: a 1/10 world (1,000 synsets of 128 images) and the ILSVRC-2012 world (1.28M images,
    # 12.8M votes, 25.6k workers)
    flock /tmp/sf-heavy.lock .venv/bin/python benchmarks/qc_scale.py --root /tmp/qcscale --images 128000,1280000
    # also a 1/10 world with ILSVRC's synset size (100 synsets of 1,280 images), and a full refit on 150M votes
    flock /tmp/sf-heavy.lock .venv/bin/python benchmarks/qc_scale.py --root /tmp/qcscale \\
        --images 128000,128000:100,1280000 --full-votes 150000000
    # quick check of the script (a few seconds)
    .venv/bin/python benchmarks/qc_scale.py --root /tmp/qcscale-tiny --images 20000 --synsets 100 --workers 2000 \\
        --fresh-synsets 8 --fresh-images 100 --new-votes 1000 --append-votes 100

The world (generated once per size into `--root/world-<images>-<synsets>-<votes per image>`, cached: a rerun skips
it): `--synsets` synsets (or the `:synsets` of an `--images` entry) of
images/synsets images each (sha256 image ids, `image_links` as ingest writes it), every image with
`--votes-per-image` votes (10) from distinct workers, `--workers` workers (25.6k at both sizes, so the two worlds
differ only in images and votes) with accuracy ~ Beta(8, 2) and `--spam` (3 %) spammers answering at random; a
pair is a true positive with p 0.5; votes spread over 30 days. The votes table is in synset order, one append per
~1.3M votes (the layout `synsetforge store compact votes --order-by wnid` leaves), as in benchmarks/scale.py.

Each measured step runs in a process of its own (peak RSS: `ru_maxrss` of that child from `os.wait4`; the parent
imports no numpy/pandas; times are measured inside the child, imports excluded, and the process wall is given too):

1. full: `run_qc(store, settings, full=True)` on a copy of the world (the world's first round: the refit);
2. that copy then goes through one crowd-loop step that is not measured: ingest adds `--fresh-images` images to
   each of `--fresh-synsets` synsets spread over the vocabulary (appended to `image_links`) and an incremental
   round plans them (`initial_votes` = 2 each): the base state;
3. round (repeated `--repeats` times, each on a fresh hard-link copy of the base): the crowd answers
   `--new-votes` (10,000) votes of that push plan: random planned pairs, each given its n_more votes from
   distinct random workers (5,000 pairs x 2 votes over the fresh synsets). Measured: `append_table("votes", ...,
   unique_by=["annotation_id", "image_id"])` as pull does + `run_qc` (incremental), which writes the push plan;
4. append: `append_table` of `--append-votes` (1,000) votes with the same unique_by, on a copy of the base;
5. baseline ("today's code" before rounds): read votes and image_links whole, `pairs_to_verify`, then
   `aggregate(votes, tasks, pairs, qc)` on the whole frame, under a watchdog that kills it at `--baseline-gb`
   RSS or `--baseline-timeout` s.

`--full-votes N` adds a world of N votes for the full-refit-only target (e.g. 150000000); it is generated in
synset batches like the others. Prints one JSON line per step and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0_US = 1_767_225_600_000_000  # 2026-01-01 UTC
SPAN_US = 30 * 86_400 * 1_000_000


# ----- the world (child side) ------------------------------------------------------------------------------------
def wnid_names(n: int) -> list[str]:
    return [f"n{10_000_000 + 7 * i:08d}" for i in range(n)]


def worker_names(n: int) -> list[str]:
    return [f"w-{j:06d}" for j in range(n)]


def image_ids(seed: int, start: int, stop: int) -> list[str]:
    import hashlib

    return [hashlib.sha256(f"{seed}/{i}".encode()).hexdigest() for i in range(start, stop)]


def crowd(cfg: dict):
    """Worker accuracies (spammers at 0.5), the same for every step of a world."""
    import numpy as np

    rng = np.random.default_rng(cfg["seed"] + 1)
    acc = rng.beta(8, 2, cfg["workers"])
    acc[rng.random(cfg["workers"]) < cfg["spam"]] = 0.5
    return acc


def truth_of(seed: int, index):
    """Whether image `index` truly shows its synset (a hash of the index: the same in every process)."""
    import numpy as np

    x = (np.asarray(index, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    return ((x >> np.uint64(33)) & np.uint64(1)).astype(bool)


def distinct_workers(rng, n_rows: int, k: int, n_workers: int):
    """(n_rows, k) worker codes, distinct within each row (redrawn where they are not)."""
    import numpy as np

    w = rng.integers(0, n_workers, (n_rows, k))
    while True:
        s = np.sort(w, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not bad.any():
            return w
        w[bad] = rng.integers(0, n_workers, (int(bad.sum()), k))


def answer_table(image_id, wnid, image_index, workers, acc, cfg: dict, rng, aid_start: int, t_start: int, t_span: int):
    """Votes as the pull step appends them: one row per (image, worker) of the (n, k) `workers` matrix."""
    import numpy as np
    import pyarrow as pa

    n, k = workers.shape
    flat = workers.reshape(-1)
    rows = np.repeat(np.arange(n), k)
    truth = truth_of(cfg["seed"], np.asarray(image_index))[rows]
    right = rng.random(n * k) < acc[flat]
    yes = np.where(right, truth, ~truth)
    when = t_start + np.sort(rng.integers(0, max(1, t_span), n * k))
    order = rng.permutation(n * k)  # votes of one image arrive at different times
    ids = pa.array(image_id) if not isinstance(image_id, pa.Array) else image_id
    wn = pa.array(wnid) if not isinstance(wnid, pa.Array) else wnid
    names = pa.array(worker_names(len(acc)))
    return pa.table({
        "annotation_id": pa.array(aid_start + np.arange(n * k, dtype=np.int64)),
        "task_id": pa.array(aid_start + rows.astype(np.int64)),
        "image_id": ids.take(pa.array(rows)),
        "wnid": wn.take(pa.array(rows)),
        "worker": names.take(pa.array(flat)),
        "answer": pa.array(np.where(yes, "yes", "no")),
        "is_gold": pa.array(np.zeros(n * k, dtype=bool)),
        "lead_time_s": pa.array(rng.gamma(2.0, 2.0, n * k)),
        "submitted_at": pa.array(when[order], pa.timestamp("us", tz="UTC")),
    })


def links_table(image_id: list[str], wnid: list[str]):
    import pyarrow as pa

    n = len(image_id)
    return pa.table({"image_id": pa.array(image_id), "wnid": pa.array(wnid), "url": pa.array(["u"] * n),
                     "source": pa.array(["local_dir"] * n), "rank": pa.array([0] * n, pa.int32()),
                     "n_urls": pa.array([1] * n, pa.int32()), "n_synsets": pa.array([1] * n, pa.int32()),
                     "multi_synset": pa.array([False] * n), "near_duplicate_of": pa.array([None] * n, pa.string())})


def step_gen(cfg: dict, root: Path) -> dict:
    """Write image_links and the votes of the world, synset batch by synset batch (votes sorted by wnid)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.store import LocalStore

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    store = LocalStore(root)
    n_img, n_syn, k = cfg["images"], cfg["synsets"], cfg["votes_per_image"]
    per = n_img // n_syn
    wnids = wnid_names(n_syn)
    ids = image_ids(cfg["seed"], 0, per * n_syn)
    syn_of = [wnids[i // per] for i in range(per * n_syn)]
    store.write_table("image_links", links_table(ids, syn_of))
    t_links = time.perf_counter() - t0
    acc = crowd(cfg)
    rng = np.random.default_rng(cfg["seed"] + 2)
    batch_syn = max(1, cfg["batch_votes"] // (per * k))
    n_votes = 0
    ids_arr, syn_arr = pa.array(ids), pa.array(syn_of)
    for s0 in range(0, n_syn, batch_syn):
        lo, hi = s0 * per, min(n_syn, s0 + batch_syn) * per
        w = distinct_workers(rng, hi - lo, k, cfg["workers"])
        votes = answer_table(ids_arr.slice(lo, hi - lo), syn_arr.slice(lo, hi - lo), np.arange(lo, hi), w, acc, cfg,
                             rng, n_votes + 1, T0_US, SPAN_US)
        votes = votes.sort_by([("wnid", "ascending"), ("submitted_at", "ascending")])
        store.append_table("votes", votes)
        n_votes += votes.num_rows
        del votes, w
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "links_seconds": t_links, "votes": n_votes, "images": per * n_syn,
            "votes_per_s": n_votes / seconds, "bytes": du(root)}


def du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def settings():
    from pipeline.config import load_settings

    return load_settings(env={})


def step_full(cfg: dict, root: Path) -> dict:
    from pipeline.qc.stage import run_qc
    from pipeline.store import LocalStore

    store = LocalStore(root)
    s = settings()
    t0 = time.perf_counter()
    out = run_qc(store, s, full=True, spill_dir=str(root.parent))
    seconds = time.perf_counter() - t0
    r = out["qc_round"]
    return {"seconds": seconds, "mode": r["mode"], "batches": r.get("batches"), "synsets": r["synsets"],
            "pairs": out.get("pairs"), "push_pairs": out.get("push_pairs")}


def step_prepare(cfg: dict, root: Path) -> dict:
    """Ingest adds fresh images to a few synsets; an incremental round plans them (not a measured step)."""
    import numpy as np

    from pipeline.qc.stage import run_qc
    from pipeline.store import LocalStore

    store = LocalStore(root)
    n_syn, f_syn, f_img = cfg["synsets"], cfg["fresh_synsets"], cfg["fresh_images"]
    wnids = wnid_names(n_syn)
    chosen = np.linspace(0, n_syn - 1, f_syn).round().astype(int)  # spread over the vocabulary (and its files)
    start = cfg["images"] + 10_000_000
    ids = image_ids(cfg["seed"], start, start + f_syn * f_img)
    syn = [wnids[int(chosen[i // f_img])] for i in range(f_syn * f_img)]
    t0 = time.perf_counter()
    store.append_table("image_links", links_table(ids, syn), unique_by=["image_id", "wnid"])
    t_links = time.perf_counter() - t0
    out = run_qc(store, settings())
    seconds = time.perf_counter() - t0
    plan = store.read_table("push_plan", filter=[("n_more", ">", 0)]).to_pandas()
    return {"seconds": seconds, "links_seconds": t_links, "mode": out["qc_round"]["mode"],
            "synsets": out["qc_round"]["synsets"], "plan_pairs": len(plan), "plan_votes": int(plan["n_more"].sum()),
            "plan_synsets": int(plan["wnid"].nunique())}


def plan_votes(store, cfg: dict, n_votes: int, rng, aid_start: int):
    """`n_votes` answers to the current push plan: random planned pairs, each given its n_more votes by distinct
    workers who have not voted on it (a fresh pair has no votes yet), until n_votes."""
    import numpy as np
    import pyarrow as pa

    plan = store.read_table("push_plan", columns=["image_id", "wnid", "n_more"], filter=[("n_more", ">", 0)]).to_pandas()
    plan = plan.iloc[rng.permutation(len(plan))].reset_index(drop=True)
    take = np.searchsorted(np.cumsum(plan["n_more"].to_numpy()), n_votes, side="left") + 1
    plan = plan.head(int(take))
    k = int(plan["n_more"].max())
    w = distinct_workers(rng, len(plan), k, cfg["workers"])
    keep = (np.arange(k)[None, :] < plan["n_more"].to_numpy()[:, None]).reshape(-1)
    image_index = np.array([int.from_bytes(bytes.fromhex(i[:8]), "big") for i in plan["image_id"]], dtype=np.int64)
    votes = answer_table(pa.array(plan["image_id"]), pa.array(plan["wnid"]), image_index, w, crowd(cfg), cfg, rng,
                         aid_start, T0_US + SPAN_US + 3_600_000_000, 3_600_000_000)
    votes = votes.filter(pa.array(keep)).slice(0, n_votes)
    return votes, {"pairs_answered": int(len(plan)), "synsets_answered": int(plan["wnid"].nunique())}


def step_round(cfg: dict, root: Path) -> dict:
    import numpy as np

    from pipeline.qc.stage import run_qc
    from pipeline.store import LocalStore

    store = LocalStore(root)
    s = settings()
    rng = np.random.default_rng(cfg["seed"] + 100 + cfg.get("rep", 0))
    votes, info = plan_votes(store, cfg, cfg["new_votes"], rng, 10**12)
    t0 = time.perf_counter()
    added = store.append_table("votes", votes, unique_by=["annotation_id", "image_id"])
    t_append = time.perf_counter() - t0
    out = run_qc(store, s)
    seconds = time.perf_counter() - t0
    r = out["qc_round"]
    plan = store.read_table("push_plan", columns=["n_more"], filter=[("n_more", ">", 0)])
    return {"seconds": seconds, "append_seconds": t_append, "qc_seconds": seconds - t_append,
            "votes_appended": added.num_rows, "mode": r["mode"], "synsets": r["synsets"], "reason": r["reason"],
            "pairs_redecided": r.get("pairs"),
            "plan_pairs_after": plan.num_rows, **info}


def step_append(cfg: dict, root: Path) -> dict:
    import numpy as np

    from pipeline.store import LocalStore

    store = LocalStore(root)
    rng = np.random.default_rng(cfg["seed"] + 200 + cfg.get("rep", 0))
    votes, _ = plan_votes(store, cfg, cfg["append_votes"], rng, 2 * 10**12 + cfg.get("rep", 0) * 10**6)
    t0 = time.perf_counter()
    added = store.append_table("votes", votes, unique_by=["annotation_id", "image_id"])
    return {"seconds": time.perf_counter() - t0, "votes_appended": added.num_rows}


def step_baseline(cfg: dict, root: Path) -> dict:
    """The QC before rounds: every vote read into one pandas frame and aggregated in memory."""
    import pandas as pd

    from pipeline.qc.stage import aggregate, pairs_to_verify
    from pipeline.store import LocalStore

    store = LocalStore(root)
    s = settings()
    t0 = time.perf_counter()
    votes = store.read_table("votes").to_pandas()
    links = store.read_table("image_links").to_pandas()
    tasks = store.read_table("tasks", missing_ok=True).to_pandas()
    t_read = time.perf_counter() - t0
    print(json.dumps({"progress": "read", "seconds": t_read, "votes": len(votes)}), flush=True)
    labels, workers, plan, _ = aggregate(votes, tasks if len(tasks) else pd.DataFrame(), pairs_to_verify(links), s.qc)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "read_seconds": t_read, "aggregate_seconds": seconds - t_read, "votes": len(votes),
            "labels": len(labels), "push_pairs": int((plan["n_more"] > 0).sum()) if len(plan) else 0}


STEPS = {"gen": step_gen, "full": step_full, "prepare": step_prepare, "round": step_round, "append": step_append,
         "baseline": step_baseline}


def child_main(step: str, cfg_json: str, root: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("NLTK_DATA", str(ROOT / ".nltk_data"))
    out = STEPS[step](json.loads(cfg_json), Path(root))
    hwm = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    out["vmhwm_mb"] = hwm
    print("RESULT " + json.dumps(out, default=str), flush=True)


# ----- the parent: one process per step ----------------------------------------------------------------------------
def vm_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_step(step: str, cfg: dict, root: Path, *, limit_mb: float | None = None, timeout: float | None = None) -> dict:
    """Run one step in a child; its wall time, its ru_maxrss (os.wait4) and the JSON it printed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", step, json.dumps(cfg), str(root)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    killed = None
    watched_peak = 0.0
    waited = None
    if limit_mb or timeout:  # poll with wait4(WNOHANG): Popen.poll would reap the child and lose its rusage
        while waited is None:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                waited = (status, usage)
                break
            rss = vm_rss_mb(proc.pid)
            watched_peak = max(watched_peak, rss)
            if limit_mb and rss > limit_mb:
                killed = f"killed at {rss / 1024:.1f} GB RSS (limit {limit_mb / 1024:.1f} GB)"
            elif timeout and time.perf_counter() - t0 > timeout:
                killed = f"killed after {timeout:.0f} s (timeout)"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    stdout = proc.stdout.read() if proc.stdout else ""
    if waited is None:
        _, status, usage = os.wait4(proc.pid, 0)
    else:
        status, usage = waited
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    result: dict = {}
    progress: dict = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif line.startswith("{"):
            progress = json.loads(line)
    result.update(step=step, images=cfg["images"], world_synsets=cfg["synsets"], wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024,
                  exit=proc.returncode)
    if killed:
        result.update(killed=killed, watched_peak_mb=watched_peak, progress=progress)
    elif proc.returncode:
        result["error"] = f"exit {proc.returncode}"
    print(json.dumps(result, default=str), flush=True)
    return result


def clone(src: Path, dst: Path) -> None:
    """A hard-link copy: the store never changes a file in place (temp file + rename), so copies share data."""
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def world_cfg(args: argparse.Namespace, images: int, synsets: int | None = None) -> dict:
    return {"images": images, "synsets": synsets or args.synsets, "workers": args.workers, "spam": args.spam, "seed": args.seed,
            "votes_per_image": args.votes_per_image, "batch_votes": args.batch_votes,
            "fresh_synsets": args.fresh_synsets, "fresh_images": args.fresh_images, "new_votes": args.new_votes,
            "append_votes": args.append_votes}


GEN_KEYS = ("images", "synsets", "workers", "spam", "seed", "votes_per_image", "batch_votes")


def ensure_world(cfg: dict, root: Path, rows: list[dict]) -> Path:
    world = root / f"world-{cfg['images']}-{cfg['synsets']}-{cfg['votes_per_image']}"
    marker = world.parent / (world.name + ".json")
    want = {k: cfg[k] for k in GEN_KEYS}
    if marker.exists() and json.loads(marker.read_text()).get("cfg") == want and world.exists():
        r = json.loads(marker.read_text())["result"]
        r["cached"] = True
        print(json.dumps(r), flush=True)
    else:
        r = run_step("gen", cfg, world)
        if r.get("exit"):
            raise SystemExit(f"generation failed: {r}")
        marker.write_text(json.dumps({"cfg": want, "result": r}))
    rows.append(r)
    return world


def run_size(args: argparse.Namespace, images: int, synsets: int | None, rows: list[dict]) -> None:
    cfg = world_cfg(args, images, synsets)
    root = Path(args.root)
    world = ensure_world(cfg, root, rows)
    tag = f"{images}-{cfg['synsets']}"
    base = root / f"base-{tag}"
    if "full" in args.steps or not base.exists():
        work = root / f"full-{tag}"
        clone(world, work)
        r = run_step("full", cfg, work)
        rows.append(r)
        r = run_step("prepare", cfg, work)
        rows.append(r)
        shutil.rmtree(base, ignore_errors=True)
        work.rename(base)
    for step in ("round", "append"):  # each repeat on a fresh copy of the base state
        if step not in args.steps:
            continue
        for rep in range(args.repeats):
            work = root / f"{step}-{tag}"
            clone(base, work)
            rows.append(run_step(step, {**cfg, "rep": rep}, work))
            shutil.rmtree(work)
    if "baseline" in args.steps:
        rows.append(run_step("baseline", cfg, world, limit_mb=args.baseline_gb * 1024, timeout=args.baseline_timeout))


def run_full_only(args: argparse.Namespace, n_votes: int, rows: list[dict]) -> None:
    """A world of n_votes votes (images = n_votes / votes_per_image) for the full-refit target alone."""
    images = n_votes // args.votes_per_image
    cfg = world_cfg(args, images)
    world = ensure_world(cfg, Path(args.root), rows)
    work = Path(args.root) / f"full-{images}-{cfg['synsets']}"
    clone(world, work)
    rows.append(run_step("full", cfg, work, limit_mb=args.baseline_gb * 1024, timeout=args.full_timeout))
    shutil.rmtree(work)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def table(rows: list[dict]) -> str:
    out = ["| images | synsets | step | runs | median s (in process) | max s | process wall s | peak RSS MB | notes |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["images"], r["world_synsets"], r["step"]), []).append(r)
    for (images, synsets, step), rs in groups.items():
        ok = [r for r in rs if "seconds" in r]
        note = ""
        first = rs[0]
        if step == "gen":
            note = (f"{first.get('votes', 0):,} votes, {first.get('votes_per_s', 0):,.0f} votes/s, "
                    f"{first.get('bytes', 0) / 1e6:,.0f} MB on disk" + (" (cached)" if first.get("cached") else ""))
        elif step == "full":
            note = f"mode {first.get('mode')}, {first.get('batches')} batches, {first.get('pairs', 0):,} pairs"
        elif step == "prepare":
            note = (f"not a target: ingest + planning round ({first.get('mode')}), plan {first.get('plan_pairs', 0):,}"
                    f" pairs / {first.get('plan_votes', 0):,} votes over {first.get('plan_synsets')} synsets")
        elif step == "round":
            note = (f"mode {first.get('mode')}, {first.get('votes_appended', 0):,} votes on "
                    f"{first.get('pairs_answered', 0):,} pairs of {first.get('synsets_answered')} synsets; "
                    f"re-decided {first.get('pairs_redecided') or 0:,} pairs of {first.get('synsets')} synsets; append median "
                    f"{median([r['append_seconds'] for r in ok]) if ok else float('nan'):.2f} s, run_qc median "
                    f"{median([r['qc_seconds'] for r in ok]) if ok else float('nan'):.2f} s")
        elif step == "append":
            note = f"{first.get('votes_appended', 0):,} votes, unique_by annotation_id+image_id"
        elif step == "baseline":
            if "killed" in first:
                note = f"{first['killed']}; {first.get('progress') or 'before reading finished'}"
            elif ok:
                note = (f"read {first['read_seconds']:.1f} s + aggregate {first['aggregate_seconds']:.1f} s, "
                        f"{first['votes']:,} votes")
            else:
                note = first.get("error", "")
        secs = [r["seconds"] for r in ok]
        med = f"{median(secs):.3f}" if secs else "-"
        mx = f"{max(secs):.3f}" if secs else "-"
        wall = f"{median([r['wall_s'] for r in rs]):.1f}"
        rss = f"{max(r['peak_rss_mb'] for r in rs):,.0f}"
        out.append(f"| {images:,} | {synsets:,} | {step} | {len(rs)} | {med} | {mx} | {wall} | {rss} | {note} |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/qcscale", help="folder for the generated worlds (kept: reruns skip them)")
    ap.add_argument("--images", default="128000,1280000",
                    help="comma-separated world sizes: images, or images:synsets (default --synsets)")
    ap.add_argument("--synsets", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=25_600)
    ap.add_argument("--spam", type=float, default=0.03, help="share of workers answering at random")
    ap.add_argument("--votes-per-image", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-votes", type=int, default=1_300_000, help="votes per generated append (whole synsets)")
    ap.add_argument("--fresh-synsets", type=int, default=32, help="synsets ingest adds images to before the round")
    ap.add_argument("--fresh-images", type=int, default=320, help="images added to each of them")
    ap.add_argument("--new-votes", type=int, default=10_000, help="votes the measured round absorbs")
    ap.add_argument("--append-votes", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the round and of the append")
    ap.add_argument("--steps", nargs="*", default=["full", "round", "append", "baseline"],
                    choices=["full", "round", "append", "baseline"])
    ap.add_argument("--baseline-gb", type=float, default=12.0, help="kill the baseline above this RSS")
    ap.add_argument("--baseline-timeout", type=float, default=900.0)
    ap.add_argument("--full-votes", type=int, default=0, help="also a full refit on a world of this many votes "
                    "(under the --baseline-gb watchdog and --full-timeout)")
    ap.add_argument("--full-timeout", type=float, default=1200.0)
    ap.add_argument("--clean", action="store_true", help="delete --root at the end (default: keep it for reruns)")
    args = ap.parse_args()
    Path(args.root).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for size in [x for x in args.images.split(",") if x]:
        images, _, synsets = size.partition(":")
        run_size(args, int(images), int(synsets) if synsets else None, rows)
    if args.full_votes:
        run_full_only(args, args.full_votes, rows)
    print(f"\nload average at end: {os.getloadavg()}")
    print(f"workers {args.workers:,} ({args.spam:.0%} spammers), {args.synsets:,} synsets, "
          f"{args.votes_per_image} votes per image; round: {args.new_votes:,} votes over the push plan of "
          f"{args.fresh_synsets} synsets x {args.fresh_images} fresh images\n")
    print(table(rows))
    if args.clean:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
