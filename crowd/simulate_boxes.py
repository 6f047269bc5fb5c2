"""Simulated box workers: drawers, quality verifiers and coverage verifiers answering from a truth table.

A drawer draws a noisy version of a true box not yet boxed (each edge jittered by a share of the box's
size), sometimes a sloppy one (loose on every side) or a wrong one (background), and now and then an
unusable one (rotated, or a click instead of a drag). A quality verifier says yes when the box's IoU with
some true box is >= 0.7, flipped with its own error rate; a coverage verifier says yes when every true
object has an accepted box at IoU >= 0.5, flipped likewise. Times per task are drawn from log-normals
around assumed medians (draw 25 s, quality 9 s, coverage 8 s: simulation parameters, not measurements).

An extreme clicker (the DET loop's `extreme` kind, Papadopoulos et al., ICCV 2017) clicks the top-, bottom-,
left- and right-most points of the same object instead of dragging a rectangle: each extreme lands within
`click_jitter` of the object's size (the points lie on the object, so the simulation gives them less noise than a
dragged corner: a parameter, not a measurement), a sloppy click misses one extreme part of the object (that side
comes out 10-35 % short), and now and then a click is lost (three points). Assumed median time 7 s per box, the
figure the paper reports for its annotators.

The answers are Label Studio shaped (a drawer returns a rectangle `value` in percent of the original
image), so the same workers drive both the in-process loop below and the real-server run in crowd/boxes.py.

    >>> truth_pairs, truth = make_truth(5, seed=1)
    >>> result = run_inprocess(truth_pairs, truth, seed=1)
    >>> result.coverage["state"].isin(["done", "capped", "gave_up"]).all()
    np.True_
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from pipeline.boxes import (
    BOX_COLUMNS,
    BOX_TABLES,
    DRAW_KINDS,
    TERMINAL,
    BoxesSettings,
    BoxTables,
    empty_frame,
    extreme_points_to_box,
    iou_matrix,
    pixels_to_percent,
    plan,
    records,
    region_to_box,
    summarize,
)

TIGHT_IOU = 0.7  # what the quality verifiers (and the benchmark) call a good box
COVER_IOU = 0.5  # a true object counts as boxed at this IoU (ILSVRC localisation threshold)
EPOCH = datetime(2026, 11, 26, tzinfo=UTC)


@dataclass(frozen=True)
class WorkerProfile:
    """One simulated worker. Error rates are per answer; times are log-normal medians in seconds."""

    name: str
    jitter: float = 0.03  # sd of each edge's offset, as a share of the box's width/height
    p_sloppy: float = 0.08  # loose box: every edge pushed out by 10-35 % of the size
    p_wrong: float = 0.03  # box on background
    p_invalid: float = 0.01  # rotated or a click instead of a drag: the pipeline rejects it
    quality_error: float = 0.05
    coverage_error: float = 0.05
    draw_s: float = 25.0
    quality_s: float = 9.0
    coverage_s: float = 8.0
    click_jitter: float = 0.018  # sd of each extreme point's offset, as a share of the box's width/height
    extreme_s: float = 7.0


def default_workers(n: int = 12, seed: int = 0) -> list[WorkerProfile]:
    """A mixed crowd: mostly careful, a quarter sloppy drawers, one poor verifier in eight."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sloppy = i % 4 == 3
        poor = i % 8 == 7
        out.append(WorkerProfile(
            name=f"sim-box-{i:02d}",
            jitter=float(rng.uniform(0.015, 0.04)),
            p_sloppy=0.25 if sloppy else 0.05,
            p_wrong=0.08 if sloppy else 0.02,
            quality_error=0.2 if poor else float(rng.uniform(0.02, 0.06)),
            coverage_error=0.2 if poor else float(rng.uniform(0.02, 0.06)),
            click_jitter=float(rng.uniform(0.009, 0.024)),
        ))
    return out


# -------------------------------------------------------------------------------------------------- truth
def make_truth(n_images: int, seed: int = 0, wnids: tuple[str, ...] = ("n02084071", "n02121808", "n02958343")
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic images with 1-5 objects of their synset (ILSVRC-like: most images hold one or two).

    Returns pairs (image_id, wnid, width, height) and truth boxes (image_id, wnid, x_min, y_min, x_max, y_max);
    objects of one image overlap by IoU < 0.3 so they are distinct instances.
    """
    rng = np.random.default_rng(seed)
    pairs, boxes = [], []
    for i in range(n_images):
        image_id = hashlib.sha256(f"sim-{seed}-{i}".encode()).hexdigest()
        wnid = wnids[i % len(wnids)]
        w, h = int(rng.integers(240, 1025)), int(rng.integers(240, 769))
        n_obj = int(min(5, 1 + rng.geometric(0.6) - 1))
        placed: list[list[float]] = []
        for _ in range(200):
            if len(placed) == n_obj:
                break
            scale = rng.uniform(0.12, 0.75 if n_obj == 1 else 0.45)
            bw, bh = scale * w * rng.uniform(0.7, 1.3), scale * h * rng.uniform(0.7, 1.3)
            bw, bh = min(bw, w - 1.0), min(bh, h - 1.0)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cand = [x0, y0, x0 + bw, y0 + bh]
            if placed and iou_matrix(np.array([cand]), np.array(placed)).max() >= 0.3:
                continue
            placed.append(cand)
        pairs.append({"image_id": image_id, "wnid": wnid, "width": w, "height": h})
        boxes += [{"image_id": image_id, "wnid": wnid, **dict(zip(BOX_COLUMNS, b, strict=True))} for b in placed]
    return pd.DataFrame(pairs), pd.DataFrame(boxes)


# -------------------------------------------------------------------------------------------------- answers
def _uncovered(truth: np.ndarray, shown: np.ndarray) -> np.ndarray:
    if len(shown) == 0:
        return np.arange(len(truth))
    return np.flatnonzero(iou_matrix(truth, shown).max(axis=1) < COVER_IOU)


def draw_answer(worker: WorkerProfile, truth: np.ndarray, shown: np.ndarray, w: int, h: int,
                rng: np.random.Generator) -> dict[str, Any]:
    """A Label Studio rectangle `value` (percent) around one object not yet boxed, with the worker's noise."""
    u = rng.random()
    if u < worker.p_invalid:
        if rng.random() < 0.5:
            return {"x": 10.0, "y": 10.0, "width": 30.0, "height": 30.0, "rotation": 25.0}
        return {"x": 40.0, "y": 40.0, "width": 0.05, "height": 0.05, "rotation": 0}
    todo = _uncovered(truth, shown)
    if u < worker.p_invalid + worker.p_wrong or len(truth) == 0:
        bw, bh = rng.uniform(0.1, 0.3) * w, rng.uniform(0.1, 0.3) * h
        for _ in range(50):  # background: somewhere no object is
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.array([x0, y0, x0 + bw, y0 + bh])
            if len(truth) == 0 or iou_matrix(box[None], truth).max() < 0.1:
                break
    else:
        # all boxed already (coverage said no by mistake): the worker redraws some object
        pick = truth[int(rng.choice(todo))] if len(todo) else truth[int(rng.integers(len(truth)))]
        bw, bh = pick[2] - pick[0], pick[3] - pick[1]
        if rng.random() < worker.p_sloppy:
            grow = rng.uniform(0.10, 0.35, size=4) * np.array([bw, bh, bw, bh])
            box = pick + grow * np.array([-1, -1, 1, 1])
        else:
            box = pick + rng.normal(0, worker.jitter, size=4) * np.array([bw, bh, bw, bh])
    box = np.clip(box, [0, 0, 0, 0], [w, h, w, h])
    value = pixels_to_percent(*(float(v) for v in box), w, h)
    return {**value, "rotation": 0}


def _target(worker: WorkerProfile, truth: np.ndarray, shown: np.ndarray, w: int, h: int, u: float,
            rng: np.random.Generator) -> np.ndarray:
    """The object an extreme clicker boxes next (or, for a wrong answer, a patch of background)."""
    todo = _uncovered(truth, shown)
    if u < worker.p_invalid + worker.p_wrong or len(truth) == 0:
        bw, bh = rng.uniform(0.1, 0.3) * w, rng.uniform(0.1, 0.3) * h
        box = np.array([0.0, 0.0, bw, bh])
        for _ in range(50):  # background: somewhere no object is
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.array([x0, y0, x0 + bw, y0 + bh])
            if len(truth) == 0 or iou_matrix(box[None], truth).max() < 0.1:
                break
        return box
    # all boxed already (coverage said no by mistake): the worker boxes some object again
    return (truth[int(rng.choice(todo))] if len(todo) else truth[int(rng.integers(len(truth)))]).copy()


def extreme_answer(worker: WorkerProfile, truth: np.ndarray, shown: np.ndarray, w: int, h: int,
                   rng: np.random.Generator) -> list[dict[str, float]]:
    """Four Label Studio keypoints (percent of the image): top, bottom, left and right extreme of one object not
    yet boxed, with the worker's noise; three points when a click is lost."""
    u = rng.random()
    x0, y0, x1, y1 = _target(worker, truth, shown, w, h, u, rng)
    bw, bh = x1 - x0, y1 - y0
    ext = np.array([y0, y1, x0, x1], dtype=np.float64)  # top y, bottom y, left x, right x
    ext += rng.normal(0, worker.click_jitter, size=4) * np.array([bh, bh, bw, bw])
    if rng.random() < worker.p_sloppy:  # one extreme part of the object missed: that side comes out short
        side = int(rng.integers(4))
        short = rng.uniform(0.10, 0.35) * (bh if side < 2 else bw)
        ext[side] += short if side in (0, 2) else -short
    points = [(rng.uniform(x0 + 0.2 * bw, x1 - 0.2 * bw), ext[0]), (rng.uniform(x0 + 0.2 * bw, x1 - 0.2 * bw), ext[1]),
              (ext[2], rng.uniform(y0 + 0.2 * bh, y1 - 0.2 * bh)), (ext[3], rng.uniform(y0 + 0.2 * bh, y1 - 0.2 * bh))]
    if u < worker.p_invalid:
        points = points[:3]
    return [{"x": float(np.clip(px, 0, w)) * 100.0 / w, "y": float(np.clip(py, 0, h)) * 100.0 / h}
            for px, py in points]


def quality_answer(worker: WorkerProfile, truth: np.ndarray, box: np.ndarray, rng: np.random.Generator) -> str:
    good = len(truth) > 0 and iou_matrix(box[None], truth).max() >= TIGHT_IOU
    return "yes" if good != (rng.random() < worker.quality_error) else "no"


def coverage_answer(worker: WorkerProfile, truth: np.ndarray, shown: np.ndarray, rng: np.random.Generator) -> str:
    covered = len(_uncovered(truth, shown)) == 0
    return "yes" if covered != (rng.random() < worker.coverage_error) else "no"


def seconds(worker: WorkerProfile, kind: str, rng: np.random.Generator) -> float:
    median = {"draw": worker.draw_s, "extreme": worker.extreme_s, "quality": worker.quality_s,
              "coverage": worker.coverage_s}[kind]
    return float(median * np.exp(rng.normal(0, 0.4)))


@dataclass
class SimAnswer:
    """One simulated annotation in Label Studio terms: a rectangle value or a choice."""

    worker: str
    kind: str
    value: Any = None  # draw: a rectangle value; extreme: a list of four points
    choice: str | None = None  # quality, coverage
    lead_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def answer_task(worker: WorkerProfile, kind: str, truth: np.ndarray, shown: np.ndarray, w: int, h: int,
                rng: np.random.Generator) -> SimAnswer:
    """What `worker` answers to a task of `kind` showing boxes `shown` (pixels) on a w x h image."""
    t = seconds(worker, kind, rng)
    if kind == "draw":
        return SimAnswer(worker.name, kind, value=draw_answer(worker, truth, shown, w, h, rng), lead_time_s=t)
    if kind == "extreme":
        return SimAnswer(worker.name, kind, value=extreme_answer(worker, truth, shown, w, h, rng), lead_time_s=t)
    if kind == "quality":
        return SimAnswer(worker.name, kind, choice=quality_answer(worker, truth, shown[0], rng), lead_time_s=t)
    return SimAnswer(worker.name, kind, choice=coverage_answer(worker, truth, shown, rng), lead_time_s=t)


def answer_row(ans: SimAnswer, *, annotation_id: int, task_id: int, image_id: str, wnid: str, w: int, h: int,
               min_size_px: float) -> dict[str, Any]:
    """A `box_answers` row from a simulated answer, through the same conversion the real pull uses."""
    row = {"annotation_id": annotation_id, "task_id": task_id, "image_id": image_id, "wnid": wnid, "kind": ans.kind,
           "worker": ans.worker, "answer": ans.choice, "x_min": None, "y_min": None, "x_max": None, "y_max": None,
           "reject_reason": None, "lead_time_s": ans.lead_time_s, "submitted_at": EPOCH}
    if ans.kind in DRAW_KINDS:
        if ans.kind == "extreme":
            box, reason = extreme_points_to_box(ans.value or [], w, h, min_size_px=min_size_px)
        else:
            box, reason = region_to_box(ans.value or {}, w, h, min_size_px=min_size_px)
        if box is None:
            row.update(answer="invalid", reject_reason=reason)
        else:
            row.update(answer="box", **dict(zip(BOX_COLUMNS, box, strict=True)))
    return row


# ------------------------------------------------------------------------------------------- in-process run
def _in(frame: pd.DataFrame, keys: set[tuple[str, str]]) -> pd.Series:
    if not len(frame) or not keys:
        return pd.Series(False, index=frame.index)
    return pd.Series([k in keys for k in zip(frame["image_id"], frame["wnid"], strict=True)], index=frame.index)


def _rows_of(frame: pd.DataFrame, keys: set[tuple[str, str]] | None, exclude: set[tuple[str, str]] | None = None
             ) -> pd.DataFrame:
    if keys is not None:
        return frame[_in(frame, keys)]
    return frame[~_in(frame, exclude or set())]


@dataclass
class SimResult:
    tasks: pd.DataFrame
    answers: pd.DataFrame
    boxes: pd.DataFrame
    coverage: pd.DataFrame
    rounds: int


def run_inprocess(
    pairs: pd.DataFrame,
    truth: pd.DataFrame,
    policy: BoxesSettings | None = None,
    workers: list[WorkerProfile] | None = None,
    seed: int = 0,
    max_rounds: int = 500,
    tables: BoxTables = BOX_TABLES,
) -> SimResult:
    """Run the box loop to the end with simulated workers and no server: plan -> answer -> plan ...

    Every round calls the same `pipeline.boxes.plan` the real loop calls, on tables built exactly as the
    Label Studio pull builds them, so what this measures is the state machine, not a model of it.
    """
    policy = policy or BoxesSettings()
    workers = workers or default_workers(seed=seed)
    rng = np.random.default_rng(seed)
    truth_by = {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby(["image_id", "wnid"])}
    size = {(r.image_id, r.wnid): (int(r.width), int(r.height)) for r in pairs.itertuples(index=False)}
    tasks, answers, boxes = empty_frame("box_tasks"), empty_frame("box_answers"), None
    all_tasks: list[pd.DataFrame] = []
    all_answers: list[pd.DataFrame] = []
    final_cov: list[pd.DataFrame] = []
    final_boxes: list[pd.DataFrame] = []
    active = pairs
    next_task, next_ann = 1, 1
    for rounds in range(max_rounds):  # noqa: B007 (reported in the result)
        p = plan(active, tasks, answers, boxes, policy, tables=tables)
        # A finished pair never changes again (its tables only grow by its own tasks): set it aside so a
        # round costs what the open pairs cost. The real loop replays everything; the result is the same.
        fin = p.coverage["state"].isin(TERMINAL)
        if fin.any():
            done = set(zip(p.coverage.loc[fin, "image_id"], p.coverage.loc[fin, "wnid"], strict=True))
            final_cov.append(p.coverage[fin])
            final_boxes.append(_rows_of(p.boxes, done))
            active = active[~_in(active, done)]
            tasks, answers = tasks[~_in(tasks, done)], answers[~_in(answers, done)]
        boxes = _rows_of(p.boxes, None, exclude=set(zip(p.coverage.loc[fin, "image_id"], p.coverage.loc[fin, "wnid"],
                                                            strict=True)))
        if p.actions.empty:
            final_cov.append(p.coverage[~fin])
            final_boxes.append(boxes)
            break
        geom = {r["box_id"]: [r[c] for c in BOX_COLUMNS] for r in records(boxes)}
        new_tasks, new_answers = [], []
        for a in records(p.actions):
            key = (a["image_id"], a["wnid"])
            w, h = size[key]
            shown = np.array([geom[b] for b in a["shown_box_ids"]], dtype=np.float64).reshape(-1, 4)
            new_tasks.append({"task_id": next_task, "project_id": 0, "request_id": a["request_id"],
                              "image_id": a["image_id"], "wnid": a["wnid"], "seq": a["seq"], "kind": a["kind"],
                              "box_id": a["box_id"], "shown_box_ids": list(a["shown_box_ids"]),
                              "overlap": a["overlap"], "pushed_at": EPOCH})
            for wi in rng.choice(len(workers), size=min(a["overlap"], len(workers)), replace=False):
                ans = answer_task(workers[int(wi)], a["kind"], truth_by.get(key, np.zeros((0, 4))), shown, w, h, rng)
                new_answers.append(answer_row(ans, annotation_id=next_ann, task_id=next_task, image_id=a["image_id"],
                                              wnid=a["wnid"], w=w, h=h, min_size_px=policy.min_size_px))
                next_ann += 1
            next_task += 1
        nt = pd.DataFrame(new_tasks, columns=list(tasks.columns))
        na = pd.DataFrame(new_answers, columns=list(answers.columns))
        all_tasks.append(nt)
        all_answers.append(na)
        tasks = pd.concat([tasks, nt], ignore_index=True) if len(tasks) else nt
        answers = pd.concat([answers, na], ignore_index=True) if len(answers) else na
    else:
        raise RuntimeError(f"box loop did not finish in {max_rounds} rounds; raise max_rounds or lower max_tasks")
    cov = pd.concat(final_cov, ignore_index=True)
    out_boxes = pd.concat([b for b in final_boxes if len(b)] or [empty_frame("boxes")], ignore_index=True)
    tasks = pd.concat(all_tasks, ignore_index=True) if all_tasks else empty_frame("box_tasks")
    answers = pd.concat(all_answers, ignore_index=True) if all_answers else empty_frame("box_answers")
    return SimResult(tasks, answers, out_boxes, cov, rounds)


# ------------------------------------------------------------------------------------------------- metrics
def evaluate(coverage: pd.DataFrame, boxes: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """The ILSVRC figures for a finished loop, against the simulation's truth.

    - truly covered: every true object matched one-to-one by an accepted box at IoU >= 0.5;
    - tight: accepted boxes with IoU >= 0.7 against their best true box;
    - tasks and worker-seconds per accepted box (and per tight box).
    """
    acc = boxes[boxes["verified"] == "accepted"] if len(boxes) else boxes
    truth_by = {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby(["image_id", "wnid"])}
    acc_by = {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in acc.groupby(["image_id", "wnid"])} if len(acc) else {}
    best_ious: list[float] = []
    truly_covered = []
    for r in coverage.itertuples(index=False):
        key = (r.image_id, r.wnid)
        t, a = truth_by.get(key, np.zeros((0, 4))), acc_by.get(key, np.zeros((0, 4)))
        if len(a):
            best_ious += list(iou_matrix(a, t).max(axis=1)) if len(t) else [0.0] * len(a)
        # greedy one-to-one matching, highest IoU first
        ok = True
        if len(t):
            m = iou_matrix(t, a) if len(a) else np.zeros((len(t), 0))
            used: set[int] = set()
            for ti in np.argsort(-m.max(axis=1) if m.shape[1] else np.zeros(len(t))):
                cands = [j for j in np.argsort(-m[ti]) if j not in used and m[ti, j] >= COVER_IOU] if m.shape[1] else []
                if not cands:
                    ok = False
                    break
                used.add(int(cands[0]))
        truly_covered.append(ok)
    s = summarize(coverage, boxes)
    ious = np.array(best_ious)
    n_tight = int((ious >= TIGHT_IOU).sum())
    return {
        "images": len(coverage),
        "objects": len(truth),
        "covered_flag_share": float(coverage["covered"].mean()) if len(coverage) else None,
        "truly_covered_share": float(np.mean(truly_covered)) if truly_covered else None,
        "boxes_accepted": len(acc),
        "tight_share": float((ious >= TIGHT_IOU).mean()) if len(ious) else None,
        "mean_iou": float(ious.mean()) if len(ious) else None,
        "tasks_per_accepted_box": s["tasks_per_accepted_box"],
        "answers_per_accepted_box": s["answers"] / len(acc) if len(acc) else None,
        "worker_s_per_accepted_box": s["worker_seconds_per_accepted_box"],
        "worker_s_per_tight_box": s["worker_seconds"] / n_tight if n_tight else None,
        "gave_up": int((coverage["state"] == "gave_up").sum()),
        "capped": int((coverage["state"] == "capped").sum()),
    }


# ------------------------------------------------------------------------------------------- a store to box
SYNSET_ROWS = {
    "n02084071": ("dog.n.01", ["dog", "domestic dog", "Canis familiaris"],
                  "a member of the genus Canis (probably descended from the common wolf) that has been domesticated "
                  "by man since prehistoric times"),
    "n02121808": ("domestic_cat.n.01", ["domestic cat", "house cat"], "any domesticated member of the genus Felis"),
    "n02958343": ("car.n.01", ["car", "auto", "automobile"], "a motor vehicle with four wheels"),
}


def render_image(width: int, height: int, boxes: np.ndarray, seed: int) -> bytes:
    """A JPEG with one coloured, textured object per true box on a gradient background (for the browser)."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([80 + 60 * xx / width, 120 + 50 * yy / height, 90 + 30 * (xx + yy) / (width + height)], axis=-1)
    img = Image.fromarray(np.clip(bg + rng.normal(0, 6, bg.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        colour = tuple(int(c) for c in rng.integers(150, 256, 3))
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour, outline=(20, 20, 20), width=2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_world(store: Any, pairs: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render the simulated images into `store` with the images, synsets and (accepted) labels tables the
    box stage reads. Image ids become the sha256 of the stored bytes, as ingest makes them; returns the
    re-keyed (pairs, truth)."""
    truth_by = {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby("image_id")}
    new_id, image_rows = {}, []
    for i, r in enumerate(pairs.itertuples(index=False)):
        data = render_image(int(r.width), int(r.height), truth_by.get(r.image_id, np.zeros((0, 4))), seed=i)
        key = store.put_content(data, ".jpg")
        digest = key.split("/")[-1].split(".")[0]
        new_id[r.image_id] = digest
        image_rows.append({"image_id": digest, "width": int(r.width), "height": int(r.height), "format": "JPEG",
                           "n_bytes": len(data), "phash": None, "storage_key": key,
                           "first_url": f"sim://boxes/{digest}.jpg", "status": "accepted", "reject_reason": None})
    pairs = pairs.assign(image_id=pairs["image_id"].map(new_id))
    truth = truth.assign(image_id=truth["image_id"].map(new_id))
    from pipeline.schemas import arrow_schema

    # other nullable columns of the images table (fingerprints, ...) stay empty for simulated images
    columns = arrow_schema("images").names
    store.write_table("images", pd.DataFrame([{c: r.get(c) for c in columns} for r in image_rows]))
    syn = [{"wnid": w, "name": n, "lemmas": lem, "gloss": g, "depth": 9, "parent_wnids": [], "lexname": "noun.animal",
            "is_leaf": False, "queries": lem} for w, (n, lem, g) in SYNSET_ROWS.items()]
    store.write_table("synsets", pd.DataFrame(syn))
    labels = pairs[["image_id", "wnid"]].assign(status="accepted", n_votes=3, n_yes=3, confidence=0.999,
                                                method="simulated")
    store.write_table("labels", labels)
    return pairs, truth
