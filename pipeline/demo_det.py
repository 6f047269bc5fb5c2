"""The demo's small DET run (`make demo` calls `det` after the classification chain): the demo's classes as a DET
vocabulary, every accepted image annotated for the presence of every class through the presence DAG (simulated
annotators answer questions and checklists in Label Studio between runs), a box around every present object by
four extreme clicks through the DET box DAG, a DET release and an ILSVRC detection evaluation of a baseline.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DET_VERSION = "1.0.0-det"
MAX_PRESENCE_ROUNDS = 20
MAX_BOX_ROUNDS = 30
DET_ENV = {
    "SYNSETFORGE__DET__SCHEME": "checklist",
    "SYNSETFORGE__DET__BOX_KIND": "extreme",
    "SYNSETFORGE__DET__MAX_VOTES": "8",  # ten annotators, one answer each per (image, node)
}


def det(store: Any, settings: Any, server: Any, corpus: Any, links: pd.DataFrame, annotators: list[Any],
        workdir: Path) -> dict[str, Any]:
    """Run the DET part of the demo on the store the classification chain filled; returns what it made."""
    from crowd.boxes import project_title as box_title
    from crowd.boxes import work_boxes
    from crowd.client import CrowdClient
    from crowd.presence import CONFIGS, det_box_pairs, det_tables, work_presence
    from crowd.presence import project_title as presence_title
    from crowd.provision import find_project
    from crowd.simulate_boxes import default_workers
    from pipeline.boxes import BOX_COLUMNS, box_settings, plan, summarize
    from pipeline.config import load_settings
    from pipeline.demo import run_dag, task_result
    from pipeline.presence import read_tree
    from pipeline.vocabulary import run_det_questions

    os.environ.update(DET_ENV)
    settings = load_settings()
    q = run_det_questions(store)
    tree = read_tree(store)
    print(f"  DET vocabulary: {q['classes']} classes under {q['questions']} question nodes from WordNet "
          f"({q['top_level']} top-level questions)")
    name_of = dict(zip(links["image_id"], links["name"], strict=False))
    truth: dict[str, set[str]] = {}
    for image_id, name in name_of.items():
        wnid = corpus.truth.get(name, {}).get("wnid")
        if wnid in tree.index:
            n = tree.index[wnid]
            truth[image_id] = {wnid, *(tree.ids[a] for a in tree.ancestors[n])}
    admin = CrowdClient(server.url, server.token)
    prefix = settings.crowd.project_prefix
    answers = 0
    for rnd in range(1, MAX_PRESENCE_ROUNDS + 1):
        t0 = time.perf_counter()
        run = run_dag("synsetforge_presence", quiet=True)
        planned = task_result(run, "plan") or {}
        line = (f"  round {rnd}: presence DAG {time.perf_counter() - t0:.0f}s, {planned.get('done', '?')}/"
                f"{planned.get('images', '?')} images fully annotated, {planned.get('next_tasks', '?')} tasks pushed")
        if planned.get("images") and planned.get("done") == planned.get("images"):
            print(line + " -> every class of every image decided", flush=True)
            break
        projects = {k: int(p["id"]) for k in CONFIGS if (p := find_project(admin, presence_title(prefix, k)))}
        n = sum(work_presence(annotators, projects, truth, seed=rnd).values())
        answers += n
        print(f"{line}; annotators answered {n}", flush=True)
    else:
        print(f"  the presence loop is not finished after {MAX_PRESENCE_ROUNDS} rounds; boxing what is done")
    images = store.read_table("det_images").to_pandas()
    done = images[images["state"] == "done"]
    right = sum(set(r.present) == ({w for w in truth.get(r.image_id, set()) if w in tree.index and
                                    tree.is_class[tree.index[w]]}) for r in done.itertuples())
    print(f"  presence: {len(done)} images fully annotated, {right} with exactly their true classes; per image "
          f"{done['n_questions'].mean():.1f} questions and {done['n_votes'].mean():.1f} answers for "
          f"{q['classes']} classes")

    tables = det_tables(settings)
    policy = box_settings(settings)
    box_truth = pd.DataFrame([
        {"image_id": i, "wnid": corpus.truth[name_of[i]]["wnid"], **dict(zip(BOX_COLUMNS, corpus.truth[name_of[i]]["box"],
                                                                            strict=True))}
        for i in truth if corpus.truth[name_of[i]].get("box")], columns=["image_id", "wnid", *BOX_COLUMNS])
    workers = list(zip(annotators[:3], default_workers(3), strict=True))
    for rnd in range(1, MAX_BOX_ROUNDS + 1):
        t0 = time.perf_counter()
        run = run_dag("synsetforge_det_boxes", quiet=True)
        pushed = (task_result(run, "push") or {}).get("pushed", "?")
        replay = plan(det_box_pairs(store), store.read_table(tables.tasks, missing_ok=True).to_pandas(),
                      store.read_table(tables.answers, missing_ok=True).to_pandas(),
                      store.read_table(tables.boxes, missing_ok=True).to_pandas(), policy, tables=tables)
        s = summarize(replay.coverage, replay.boxes)
        line = (f"  round {rnd}: DET box DAG {time.perf_counter() - t0:.0f}s, pushed {pushed}, {s['boxes_accepted']} "
                f"boxes accepted, {s['finished']}/{s['pairs']} (image, class) pairs finished")
        if replay.actions.empty and s["waiting"] == 0:
            print(line + " -> done", flush=True)
            break
        projects = {k: int(find_project(admin, box_title(prefix, k, tables.project_stem))["id"])
                    for k in (tables.draw_kind, "quality", "coverage")}
        n = sum(work_boxes(workers, projects, box_truth, seed=rnd).values())
        print(f"{line}; workers answered {n}", flush=True)
    else:
        print(f"  the DET box loop is not finished after {MAX_BOX_ROUNDS} rounds; releasing what is boxed")

    from pipeline.evaluate import evaluate, format_result, ground_truth_from_release
    from pipeline.release.manifest import read_manifest

    run_dag("synsetforge_det_release", {"version": DET_VERSION, "val": 0.4, "test": 0.2})
    manifest = read_manifest(store, DET_VERSION)
    print(f"  DET release {DET_VERSION}: images per split {json.dumps(manifest['splits'], sort_keys=True)}, "
          f"{manifest['stats']['boxes']} boxes of {manifest['stats']['present_pairs']} present (image, class) pairs; "
          f"{manifest['stats']['not_fully_annotated'] + manifest['stats']['boxes_unfinished']} images left out")
    gt = ground_truth_from_release(store, DET_VERSION, "val")
    rng = np.random.default_rng(0)
    lines = []  # a baseline: every true box found a little loose, plus one false alarm per image
    for r in gt.boxes.itertuples():
        w, h = r.x_max - r.x_min, r.y_max - r.y_min
        pos = gt.order.index(r.image_id) + 1
        lines.append(f"{pos} {r.cls} {rng.uniform(0.5, 1):.3f} {r.x_min - 0.05 * w:.1f} {r.y_min - 0.05 * h:.1f} "
                     f"{r.x_max + 0.05 * w:.1f} {r.y_max + 0.05 * h:.1f}")
    for pos in range(1, len(gt.order) + 1):
        lines.append(f"{pos} {1 + pos % len(gt.wnids)} {rng.uniform(0, 0.6):.3f} 0 0 20 20")
    pred = workdir / "baseline_det.txt"
    pred.write_text("\n".join(lines) + "\n")
    print("  baseline detections (every true val box, 5 % loose, plus a false alarm per image), ILSVRC DET AP:")
    print("  " + format_result(evaluate("det", pred, gt)).replace("\n", "\n  "))
    return {"release": str(Path(store.root) / "releases" / DET_VERSION), "answers": answers}
