"""Challenge server benchmarks: Blum & Hardt's boosting attack, scoring and bootstrap speed, concurrent uploads.

    .venv/bin/python benchmarks/challenge.py                 # everything (run under flock /tmp/sf-heavy.lock)
    .venv/bin/python benchmarks/challenge.py --only attack --runs 5

attack: labels are n random bits (the public part of the test set; as many fresh ones score the private part).
The attacker submits k random 0/1 vectors, keeps those whose public score beats chance (below 0.5 error),
and submits their coordinate-wise majority; scores are rounded to 5 decimals. Naive public board vs the
parameter-free Ladder (Blum & Hardt, ICML 2015: 0.427 and 0.484, mean of 5). Every submission goes through the
challenge service (validation, scoring, the database, the Ladder) on an in-memory SQLite database.
scoring: a 100,000-image top-5 submission (1,000 classes) validated, scored and recorded; 1,000 bootstrap rounds
over 100,000 images for one entry and a 10-entry board.
uploads: 50 concurrent uploaders (10 teams of 5) against a real server on loopback, limit 3 per week: every
answer accounted for, no submission lost, every team at exactly its limit; SQLite and PostgreSQL.
reference: the paper's reference interval (IJCV 2015 sec. 6.2): 6.66 % top-5 error on the 100,000 test images has
the 99.9 % bootstrap interval [6.40, 6.92]; ours over 20 seeds with the boards' 1,000 rounds, and with 100,000.
analysis: per-class scale, instances per image, CPL and their correlations with the accuracy of the top entries
(sec. 6.3) for a challenge in a store (default: `make demo`'s demo-cls in demo-output/store; the phase is closed
in a copy, the store itself is not touched), and the CPL of a synthetic world's random boxes.

    .venv/bin/python benchmarks/challenge.py --only reference analysis
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from challenge.db import make_engine  # noqa: E402
from challenge.service import ChallengeService  # noqa: E402
from challenge.truth import held_out_from_arrays  # noqa: E402

NOW = datetime(2026, 12, 1, 12, 0)


def _bits(v: np.ndarray) -> bytes:
    return ("\n".join(np.where(v == 1, "2", "1")) + "\n").encode()


def boosting_attack(seed: int, ladder: bool, n: int = 4000, k: int = 400, db: str = "sqlite://") -> dict[str, float]:
    """One run of the attack; returns the attacker's reported public error, its private-board error and the
    error of its final vector on the fresh (private) labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 3, 2 * n)  # 2n test images: n public, n private (fresh) labels
    held = held_out_from_arrays(labels, 2, version=f"attack{seed}")
    svc = ChallengeService(make_engine(db), None)
    svc.provide_held_out(held.version, held)
    slug = f"attack-{seed}-{int(ladder)}"
    svc.create_challenge(slug, held.version, "cls", [dict(name="main", opens_at=NOW - timedelta(days=1),
                                                          closes_at=NOW + timedelta(days=30), unlimited=True)],
                         ladder=ladder, public_fraction=0.5, score_decimals=5)
    team, _ = svc.add_team(f"attacker-{seed}")
    kept = []
    for _ in range(k):
        u = rng.integers(0, 2, 2 * n)
        if svc.submit(slug, team.id, _bits(u), now=NOW).shown_score < 0.5:
            kept.append(u)
    maj = (np.mean(kept, axis=0) > 0.5).astype(int) if kept else rng.integers(0, 2, 2 * n)
    final = svc.submit(slug, team.id, _bits(maj), now=NOW)
    svc.select_finals(slug, team.id, [final.submission_id], now=NOW)
    from challenge.boards import build_board

    later = NOW + timedelta(days=31)
    private = build_board(svc, slug, "private", now=later).rows[0].score
    public_mask = svc.public_mask(svc.challenge(slug))
    fresh = float(np.mean((maj + 1)[~public_mask] != labels[~public_mask]))
    return {"public": float(final.shown_score), "private": float(private), "fresh": fresh, "kept": len(kept)}


def run_attack(runs: int, n: int, k: int) -> list[str]:
    out = [f"| board | reported public error (mean of {runs}) | private board error | fresh-label error | published |",
           "|---|---:|---:|---:|---:|"]
    for ladder, published in ((False, 0.427), (True, 0.484)):
        t0 = time.perf_counter()
        res = [boosting_attack(s, ladder, n, k) for s in range(runs)]
        pub = statistics.mean(r["public"] for r in res)
        out.append(f"| {'Ladder' if ladder else 'naive'} | {pub:.4f} (runs: "
                   + ", ".join(f"{r['public']:.4f}" for r in res) + f") | "
                   f"{statistics.mean(r['private'] for r in res):.4f} | {statistics.mean(r['fresh'] for r in res):.4f}"
                   f" | {published} (diff {pub - published:+.4f}) |")
        print(f"  {'ladder' if ladder else 'naive'}: {runs} runs of {k + 1} submissions in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return out


def run_scoring() -> list[str]:
    from challenge.scoring import Evaluation, bootstrap, evaluate_submission, read_submission

    n, classes = 100_000, 1000
    rng = np.random.default_rng(0)
    truth = rng.integers(1, classes + 1, n)
    held = held_out_from_arrays(truth, classes, version="speed")
    guesses = rng.integers(1, classes + 1, (n, 5))
    guesses[: n // 2, rng.integers(0, 5)] = truth[: n // 2]
    data = "".join(" ".join(map(str, g)) + "\n" for g in guesses).encode()
    t0 = time.perf_counter()
    ev = evaluate_submission(read_submission(data, "cls", held), held)
    t_score = time.perf_counter() - t0
    svc = ChallengeService(make_engine("sqlite://"), None)
    svc.provide_held_out("speed", held)
    svc.create_challenge("speed", "speed", "cls", [dict(name="main", opens_at=NOW - timedelta(days=1),
                                                        closes_at=NOW + timedelta(days=1), unlimited=True)])
    team, _ = svc.add_team("speed")
    svc.submit("speed", team.id, data, now=NOW)  # warm caches (partition of the test set)
    t0 = time.perf_counter()
    svc.submit("speed", team.id, data, now=NOW)
    t_submit = time.perf_counter() - t0
    evs = [ev] + [Evaluation("cls", {}, loss=(rng.random(n) < 0.3 + 0.01 * j).astype(np.uint8),
                             scored=np.ones(n, bool), n=n) for j in range(9)]
    everything = np.ones(n, bool)
    t0 = time.perf_counter()
    bootstrap(evs[:1], everything, 1000)
    t_b1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    bootstrap(evs, everything, 1000)
    t_b10 = time.perf_counter() - t0
    return ["| step | seconds | target |", "|---|---:|---:|",
            f"| validate + score a 100,000-image top-5 text submission (1,000 classes) | {t_score:.2f} | <= 2 |",
            f"| the same through the service (validate, score, hash, signature, SQLite insert) | {t_submit:.2f} | <= 2 |",
            f"| 1,000 bootstrap rounds over 100,000 images, one entry | {t_b1:.3f} | <= 2 |",
            f"| 1,000 bootstrap rounds over 100,000 images, a 10-entry board (paired) | {t_b10:.3f} | <= 2 |"]


def _post(url: str, token: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def concurrent_uploads(db_url: str | None, workdir: Path, *, teams: int = 10, per_team: int = 5, limit: int = 3
                       ) -> dict[str, object]:
    """A real server (uvicorn, `synsetforge challenge serve`) on a challenge release; teams * per_team uploaders
    at once; returns what came back and what the database holds."""
    from challenge.db import Submission, read_session
    from challenge.service import open_service
    from pipeline.release.build import build_release
    from pipeline.release.synthetic import make_fixture
    from pipeline.services import free_port, start_service
    from pipeline.store import LocalStore

    store_dir = workdir / "store"
    store = LocalStore(store_dir)
    make_fixture(store, n_classes=4, per_class=12, seed=7, box_fraction=0.0)
    build_release(store, "bench", val_per_class=2, test_per_class=4, neardup=False, challenge=True)
    db = db_url or f"sqlite:///{workdir / 'challenge.db'}"
    svc = open_service(str(store_dir), db)
    now = datetime.utcnow()
    svc.create_challenge("bench", "bench", "cls", [dict(name="main", opens_at=now - timedelta(hours=1),
                                                        closes_at=now + timedelta(days=3), per_week=limit)])
    held = svc.held_out("bench")
    tokens = [svc.add_team(f"team{t:02d}")[1] for t in range(teams)]
    port = free_port()
    server = start_service("challenge", [str(ROOT / ".venv/bin/synsetforge"), "--store", str(store_dir), "challenge",
                                         "--db", db, "serve", "--port", str(port)],
                           url=f"http://127.0.0.1:{port}", ready_path="/healthz", log_path=workdir / "server.log")
    results: list[tuple[int, int, dict]] = []
    lock = threading.Lock()
    start = threading.Barrier(teams * per_team)

    def upload(t: int, j: int) -> None:
        guesses = [[(c + j) % 4 + 1] for c in held.truth]
        data = "".join(" ".join(map(str, g)) + "\n" for g in guesses).encode()
        start.wait()
        status, body = _post(f"{server.url}/api/c/bench/submissions", tokens[t], data)
        with lock:
            results.append((t, status, body))

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=upload, args=(t, j)) for t in range(teams) for j in range(per_team)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
    finally:
        server.stop()
    with read_session(svc.engine) as s:
        stored = {(x.team_id, x.id) for x in s.query(Submission)}
    team_ids = {svc.team_id(f"team{t:02d}"): t for t in range(teams)}
    accepted = [(t, b["id"]) for t, st, b in results if st == 201]
    per_team_db = {t: sum(1 for tid, _ in stored if team_ids[tid] == t) for t in range(teams)}
    lost = [i for t, i in accepted if i not in {sid for _, sid in stored}]
    svc.engine.dispose()
    return {"answers": len(results), "statuses": sorted({st for _, st, _ in results}), "accepted": len(accepted),
            "limited": sum(1 for _, st, _ in results if st == 429), "lost": len(lost),
            "per_team": per_team_db, "exact": all(v == min(limit, per_team) for v in per_team_db.values()),
            "seconds": elapsed}


def run_uploads(postgres: bool) -> list[str]:
    out = ["| database | uploaders | answers | accepted | refused at the limit (429) | lost | every team at its limit "
           "(3) | seconds |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    targets = [("SQLite", None)]
    pg = None
    if postgres:
        from challenge.postgres import start_postgres

        pg = start_postgres(Path(tempfile.mkdtemp(prefix="sf-pg-log-")))
        targets.append(("PostgreSQL 15", pg.url))
    try:
        for name, url in targets:
            r = concurrent_uploads(url, Path(tempfile.mkdtemp(prefix="sf-bench-up-")))
            out.append(f"| {name} | 50 | {r['answers']} | {r['accepted']} | {r['limited']} | {r['lost']} | "
                       f"{'yes' if r['exact'] else 'NO ' + str(r['per_team'])} | {r['seconds']:.1f} |")
    finally:
        if pg is not None:
            pg.stop()
    return out


def run_reference(seeds: int = 20) -> list[str]:
    """The paper's 2014 classification winner: 6.66 % top-5 error on 100,000 images, 99.9 % interval [6.40, 6.92]."""
    from challenge.scoring import Evaluation, bootstrap, interval

    n, wrong = 100_000, 6_660
    loss = np.zeros(n, dtype=np.uint8)
    loss[np.random.default_rng(2014).choice(n, wrong, replace=False)] = 1
    ev = Evaluation("cls", {}, loss=loss, scored=np.ones(n, bool), n=n)
    everything = np.ones(n, bool)
    out = ["| rounds | seeds | 99.9 % interval (mean of the ends) | lowest end: min-max | highest end: min-max | "
           "paper | seconds per interval |", "|---:|---:|---|---|---|---|---:|"]
    for rounds, k in ((1000, seeds), (100_000, 3)):
        ends, t = [], time.perf_counter()
        for seed in range(k):
            ends.append(interval(bootstrap([ev], everything, rounds, seed=seed)[:, 0], 0.999))
        secs = (time.perf_counter() - t) / k
        lo, hi = np.array(ends).T * 100
        out.append(f"| {rounds:,} | {k} | [{lo.mean():.2f}, {hi.mean():.2f}] | {lo.min():.2f}-{lo.max():.2f} | "
                   f"{hi.min():.2f}-{hi.max():.2f} | [6.40, 6.92] | {secs:.3f} |")
    se = np.sqrt(0.0666 * (1 - 0.0666) / n) * 100
    out.append(f"normal approximation: 6.66 +- 3.29 * {se:.4f} = [{6.66 - 3.29 * se:.2f}, {6.66 + 3.29 * se:.2f}]")
    return out


def run_analysis(store_dir: str, slug: str) -> list[str]:
    """Scale, instances per image and CPL per class with their correlations, for challenge `slug` in a copy of the
    store at `store_dir` (its phase closed in the copy), and the CPL of a synthetic world's random boxes."""
    import shutil

    from challenge.analysis import analysis_for, class_properties
    from challenge.service import open_service

    out = []
    src = Path(store_dir)
    if (src / "challenge" / "challenge.db").exists():
        copy = Path(tempfile.mkdtemp(prefix="sf-bench-analysis-")) / "store"
        shutil.copytree(src, copy, ignore=shutil.ignore_patterns("blobs", "tables", "ingest", "collect"))
        (copy / "blobs").symlink_to(src.resolve() / "blobs")  # read only: the test images' bytes are not needed
        svc = open_service(str(copy))
        svc.close(slug)
        a = analysis_for(svc, slug, plots=False)
        ch = svc.challenge(slug)
        out.append(f"{slug} ({ch.release}, {ch.n_test} test images), private board's top entries {a.entries}:")
        cols = ["wnid", "images", "boxes", "scale", "instances", "cpl", "accuracy"]
        out.append(a.classes[cols].to_markdown(index=False, floatfmt=".3f"))
        for k, c in a.correlations.items():
            out.append(f"accuracy vs {k}: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} over "
                       f"{c['classes']} classes")
        cpl = a.classes.cpl.to_numpy(dtype=float)
        out.append(f"CPL mean over classes {np.nanmean(cpl) * 100:.1f} % (PASCAL 8.8 %, ILSVRC-2012 20.8 %)")
    else:
        out.append(f"(no challenge database in {store_dir}: run `make demo` first for the demo's figures)")
    from pipeline.release.build import build_release
    from pipeline.release.synthetic import make_fixture
    from pipeline.store import LocalStore

    world = LocalStore(Path(tempfile.mkdtemp(prefix="sf-bench-cpl-")))
    make_fixture(world, n_classes=20, per_class=30, seed=3, box_fraction=1.0, near_dups_per_class=0)
    build_release(world, "cpl", val_per_class=2, test_per_class=15, neardup=False, challenge=True)
    from challenge.truth import load_held_out

    props = class_properties(load_held_out(world, "cpl"))
    out.append(f"synthetic world (20 classes, {int(props.boxes.sum())} test boxes drawn uniformly at random): CPL "
               f"mean {props.cpl.mean() * 100:.1f} %, classes {props.cpl.min() * 100:.1f}-{props.cpl.max() * 100:.1f} "
               f"%; instances per image {props.instances.mean():.2f}; scale {props.scale.mean():.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", choices=["attack", "scoring", "uploads", "reference", "analysis"])
    p.add_argument("--store", default=str(ROOT / "demo-output" / "store"), help="analysis: the store to read")
    p.add_argument("--challenge", default="demo-cls", help="analysis: the challenge to analyse")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--k", type=int, default=400)
    p.add_argument("--no-postgres", action="store_true")
    args = p.parse_args(argv)
    only = set(args.only or ["attack", "scoring", "uploads", "reference", "analysis"])
    if "reference" in only:
        print("\n".join(run_reference()), flush=True)
    if "analysis" in only:
        print("\n".join(run_analysis(args.store, args.challenge)), flush=True)
    if "scoring" in only:
        print("\n".join(run_scoring()), flush=True)
    if "attack" in only:
        print("\n".join(run_attack(args.runs, args.n, args.k)), flush=True)
    if "uploads" in only:
        print("\n".join(run_uploads(not args.no_postgres)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
