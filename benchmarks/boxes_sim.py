"""Box loop on a seeded simulation, set beside the ILSVRC figures and one-pass drawing baselines.

    .venv/bin/python benchmarks/boxes_sim.py --images 3000            # in-process, large
    .venv/bin/python benchmarks/boxes_sim.py --images 0 --server 6    # real Label Studio, small
    .venv/bin/python benchmarks/boxes_sim.py --images 3000 --det      # + extreme clicking (the DET box kind)

In-process rows run pipeline.boxes.plan (the state machine the real loop uses) with simulated workers
(crowd/simulate_boxes.py); the baselines are what a drawing service without verification delivers with the
same workers: one drawer per object, or three drawers per object consolidated by IoU clustering + median
(both told how many objects there are, which the loop has to find out through coverage votes). The
real-server row runs the same loop through Label Studio (push, next-task, submit, export, pull).
Worker-seconds are simulated (assumed medians: draw 25 s, quality 9 s, coverage 8 s per answer).

--det adds rows for extreme clicking (the DET loop's box kind: four clicks on the object's extreme points,
Papadopoulos et al., ICCV 2017) through the same loop in the same run, on the same images and workers: assumed
median 7 s per click task (the paper's reported time per box), the clicks' noise a simulation parameter
(crowd/simulate_boxes.py). --quality-s / --coverage-s change the assumed verification times of every row.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import replace  # noqa: E402

from crowd.simulate_boxes import (  # noqa: E402
    TIGHT_IOU,
    default_workers,
    draw_answer,
    evaluate,
    extreme_answer,
    make_truth,
    run_inprocess,
    seconds,
)
from pipeline.boxes import (  # noqa: E402
    BOX_COLUMNS,
    BOX_TABLES,
    BoxesSettings,
    consolidate,
    det_box_tables,
    extreme_points_to_box,
    iou_matrix,
    region_to_box,
)

ILSVRC = {"truly_covered_share": 0.979, "tight_share": 0.992, "worker_s_per_accepted_box": 35.0}


def baseline(pairs: pd.DataFrame, truth: pd.DataFrame, drawers: int, seed: int, kind: str = "draw") -> dict:
    """No verification: each true object drawn (or extreme-clicked) by `drawers` workers, consolidated, accepted
    as is."""
    rng = np.random.default_rng(seed)
    workers = default_workers(seed=seed)
    size = {r.image_id: (int(r.width), int(r.height)) for r in pairs.itertuples(index=False)}
    rows, secs, n_tasks = [], 0.0, 0
    for image_id, g in truth.groupby("image_id"):
        w, h = size[image_id]
        t = g[BOX_COLUMNS].to_numpy(np.float64)
        for k in range(len(t)):
            drawn = []
            for wi in rng.choice(len(workers), size=drawers, replace=False):
                # each drawer is asked for object k (shown the others as done), as a per-object HIT would
                shown = np.delete(t, k, axis=0)
                if kind == "extreme":
                    value = extreme_answer(workers[int(wi)], t, shown, w, h, rng)
                    box, _ = extreme_points_to_box(value, w, h)
                else:
                    value = draw_answer(workers[int(wi)], t, shown, w, h, rng)
                    box, _ = region_to_box(value, w, h)
                secs += seconds(workers[int(wi)], kind, rng)
                if box is not None:
                    drawn.append(box)
            n_tasks += 1
            if drawn:
                rows.append({"image_id": image_id, **dict(zip(BOX_COLUMNS, consolidate(drawn)[0].box, strict=True))})
    boxes = pd.DataFrame(rows)
    ious = np.array([iou_matrix(np.array([[r[c] for c in BOX_COLUMNS]]),
                                truth[truth["image_id"] == r["image_id"]][BOX_COLUMNS].to_numpy()).max()
                     for r in boxes.to_dict("records")])
    covered = []
    for image_id, g in truth.groupby("image_id"):
        b = boxes[boxes["image_id"] == image_id][BOX_COLUMNS].to_numpy() if len(boxes) else np.zeros((0, 4))
        covered.append(bool(len(b)) and bool((iou_matrix(g[BOX_COLUMNS].to_numpy(), b).max(axis=1) >= 0.5).all()))
    return {"images": len(pairs), "truly_covered_share": float(np.mean(covered)), "tight_share": float((ious >= TIGHT_IOU).mean()),
            "tasks_per_accepted_box": n_tasks / len(boxes), "answers_per_accepted_box": n_tasks * drawers / len(boxes),
            "worker_s_per_accepted_box": secs / len(boxes), "covered_flag_share": None}


def server_run(n_images: int, seed: int) -> dict:
    """The same loop on a real Label Studio with three simulated box workers (mixed profiles)."""
    from crowd.boxes import run_until_done
    from crowd.client import CrowdClient
    from crowd.server import start_labelstudio
    from crowd.simulate import Profile, make_annotators
    from crowd.simulate_boxes import write_world
    from pipeline.config import load_settings
    from pipeline.store import LocalStore

    base = Path(tempfile.mkdtemp(prefix="sf-boxbench-"))
    files = base / "files"
    files.mkdir()
    server = start_labelstudio(base / "data", files_root=files, timeout=300)
    try:
        store = LocalStore(files / "store")
        pairs, truth = make_truth(n_images, seed=seed)
        pairs, truth = write_world(store, pairs, truth)
        settings = load_settings(env={}, overrides={"store": {"url": str(store.root)}, "crowd": {
            "url": server.url, "token": server.token, "pseudonym_key": "bench", "files_root": str(files)}})
        admin = CrowdClient(server.url, server.token)
        annotators = make_annotators(admin, [Profile()] * 3, prefix="boxbench", password="bench-pass-1234")
        workers = list(zip(annotators, default_workers(3, seed=seed), strict=True))
        t0 = time.perf_counter()
        out = run_until_done(store, settings, workers, truth, client=admin, seed=seed)
        wall = time.perf_counter() - t0
        m = evaluate(store.read_table("coverage").to_pandas(), store.read_table("boxes").to_pandas(), truth)
        return {**m, "wall_s": wall, "rounds": out["rounds"], "annotations": out["annotations"]}
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.1f} %" if pct else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000, help="in-process simulation size (0 to skip)")
    ap.add_argument("--server", type=int, default=0, help="images for a real Label Studio run (0 to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--det", action="store_true", help="also extreme clicking (the DET box kind) in the same run")
    ap.add_argument("--quality-s", type=float, default=None, help="assumed seconds per quality answer (default 9)")
    ap.add_argument("--coverage-s", type=float, default=None, help="assumed seconds per coverage answer (default 8)")
    ap.add_argument("--only-det", action="store_true", help="with --det: the drawing default and the DET rows only")
    args = ap.parse_args(argv)
    rows = []
    times = {k: v for k, v in (("quality_s", args.quality_s), ("coverage_s", args.coverage_s)) if v is not None}
    workers = [replace(w, **times) for w in default_workers(seed=args.seed)]
    if args.images:
        pairs, truth = make_truth(args.images, seed=args.seed)
        strict = {"quality_overlap": 3, "quality_max_votes": 3, "coverage_overlap": 3, "coverage_max_votes": 3}
        lean = {"quality_overlap": 1, "quality_max_votes": 1, "coverage_overlap": 1, "coverage_max_votes": 1}
        setups = [
            ("loop: 1 drawer, 2(+1) quality + 2(+1) coverage votes (default)", BoxesSettings()),
            ("loop: 1 drawer, fixed 3 quality + 3 coverage votes", BoxesSettings(**strict)),
            ("loop: 1 drawer, 1 quality + 1 coverage vote", BoxesSettings(**lean)),
            ("loop: 3 drawers consolidated, 2(+1) + 2(+1) votes", BoxesSettings(draw_overlap=3)),
            ("loop: Dawid-Skene on 2(+1) quality votes", BoxesSettings(method="dawid_skene")),
        ]
        extreme = det_box_tables("extreme")
        det_setups = [
            ("DET extreme clicks: 2(+1) quality + 2(+1) coverage votes (default)", BoxesSettings(), extreme),
            ("DET extreme clicks: 1 quality + 1 coverage vote", BoxesSettings(**lean), extreme),
        ] if args.det else []
        all_setups = [(n, p, BOX_TABLES) for n, p in setups] + det_setups
        if args.only_det:
            all_setups = all_setups[:1] + det_setups
        for name, policy, tables in all_setups:
            t0 = time.perf_counter()
            r = run_inprocess(pairs, truth, policy, workers=workers, seed=args.seed, tables=tables)
            m = evaluate(r.coverage, r.boxes, truth)
            if tables.draw_kind == "extreme":  # seconds spent making boxes vs verifying them
                a = r.answers
                m["make_s_per_accepted_box"] = float(a.loc[a["kind"] == "extreme", "lead_time_s"].sum()) / max(
                    m["boxes_accepted"], 1)
            rows.append((name, m, time.perf_counter() - t0))
        if args.only_det:
            args.server = 0
        if args.det:
            t0 = time.perf_counter()
            rows.append(("DET baseline: 1 extreme clicker per object, no verification",
                         baseline(pairs, truth, 1, args.seed, kind="extreme"), time.perf_counter() - t0))
        for drawers in (() if args.only_det else (1, 3)):
            t0 = time.perf_counter()
            rows.append((f"baseline: {drawers} drawer(s) per object, no verification",
                         baseline(pairs, truth, drawers, args.seed), time.perf_counter() - t0))
    if args.server:
        t0 = time.perf_counter()
        m = server_run(args.server, args.seed)
        rows.append((f"loop on real Label Studio, 3 workers ({m['rounds']} rounds, {m['annotations']} annotations)", m,
                     time.perf_counter() - t0))
    print(f"\nobjects per image ~{len(truth) / len(pairs):.2f}" if args.images else "")
    print(f"assumed times: {', '.join(f'{k} {v:g} s' for k, v in {'draw': workers[0].draw_s, 'extreme': workers[0].extreme_s, 'quality': workers[0].quality_s, 'coverage': workers[0].coverage_s}.items())}")
    print("| setup | images | covered (flag) | truly covered | tight IoU>=0.7 | tasks/box | answers/box | "
          "worker-s/box | worker-s/box vs ILSVRC 35 s | run s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| ILSVRC 2012 (Su et al.), reported | - | - | {fmt(ILSVRC['truly_covered_share'], True)} | "
          f"{fmt(ILSVRC['tight_share'], True)} | - | - | ~35 | 1.00x | - |")
    for name, m, secs in rows:
        ws = m.get("worker_s_per_accepted_box")
        print(f"| {name} | {m['images']} | {fmt(m.get('covered_flag_share'), True)} | "
              f"{fmt(m['truly_covered_share'], True)} | {fmt(m['tight_share'], True)} | "
              f"{fmt(m['tasks_per_accepted_box'])} | {fmt(m['answers_per_accepted_box'])} | {fmt(ws)} | "
              f"{ws / ILSVRC['worker_s_per_accepted_box']:.2f}x | {secs:.1f} |")
        if "make_s_per_accepted_box" in m:
            print(f"|   of which clicking | | | | | | | {fmt(m['make_s_per_accepted_box'])} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
