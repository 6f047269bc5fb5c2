"""Bounding boxes the ILSVRC way: draw one box, verify its quality, verify coverage, repeat.

Su, Deng and Fei-Fei (2012) split box annotation into three micro-tasks: *drawing* (one box around one
object not yet boxed), *quality verification* (is this box tight around one whole object?) and *coverage
verification* (is every object boxed?). This module is the pure core of that loop plus a thin I/O shell:

- geometry: Label Studio percent values <-> stored-image pixels (exact), rotation rejected, clamping,
  degenerate and out-of-image boxes rejected with a reason; IoU;
- consolidation: several drawings of the same object clustered by IoU, the median of coordinates kept;
- the state machine per (image, wnid): draw -> quality -> (accepted | redraw) -> coverage -> (done | draw
  another), with caps. It keeps no state in memory: `plan` replays the `box_tasks` and `box_answers`
  tables (and the frozen verdicts of the `boxes` table) and returns the next tasks to push, the `boxes`
  table and the per-image `coverage` table. A crash anywhere loses nothing: rerun and it resumes.

The Label Studio side (configs, push, pull) is crowd/boxes.py; simulated workers are crowd/simulate_boxes.py.

    >>> pairs = pd.DataFrame({"image_id": ["img1"], "wnid": ["n02084071"], "width": [640], "height": [480]})
    >>> p = plan(pairs, empty_frame("box_tasks"), empty_frame("box_answers"))
    >>> p.actions[["kind", "seq"]].to_dict("records")
    [{'kind': 'draw', 'seq': 0}]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import BoxesSettings
from pipeline.errors import UserError
from pipeline.schemas import empty_table
from pipeline.store import store_from_settings

KINDS = ("draw", "extreme", "quality", "coverage")
DRAW_KINDS = ("draw", "extreme")  # the ways one new box is made: dragging a rectangle, or four extreme clicks
TERMINAL = ("done", "capped", "gave_up")
DUPLICATES_TO_RECHECK = 2  # new boxes in a row that duplicate accepted ones before coverage is asked again
BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]


# ----------------------------------------------------------------------------------------------- policy
BoxPolicy = BoxesSettings  # the pure core only reads it (defined in pipeline.config: DAG files import that)


def box_settings(settings: Any) -> BoxesSettings:
    """The boxes section of Settings, or defaults while pipeline.config has no such section."""
    section = getattr(settings, "boxes", None)
    if isinstance(section, BoxesSettings):
        return section
    if section is not None:
        return BoxesSettings.model_validate(section.model_dump() if hasattr(section, "model_dump") else section)
    return BoxesSettings()


class BoxInputError(UserError):
    """A region or table given to the box stage is not usable; the message says which and why."""


# ---------------------------------------------------------------------------------------------- geometry
def percent_to_pixels(x: float, y: float, width: float, height: float, image_w: int, image_h: int) -> tuple[float, ...]:
    """Label Studio rectangle (percent of the original image) -> (x_min, y_min, x_max, y_max) in pixels.

    Computed with exact rational arithmetic and rounded once, so no error beyond the last float bit
    creeps in whatever the canvas size the annotator saw.

    >>> percent_to_pixels(19.94, 30.02, 59.92, 39.82, 1000, 500)
    (199.4, 150.1, 798.6, 349.2)
    """
    fx, fy, fw, fh = (Fraction(v) for v in (x, y, width, height))
    W, H = Fraction(image_w), Fraction(image_h)
    return (
        float(fx * W / 100), float(fy * H / 100), float((fx + fw) * W / 100), float((fy + fh) * H / 100),
    )


def pixels_to_percent(x_min: float, y_min: float, x_max: float, y_max: float, image_w: int, image_h: int) -> dict[str, float]:
    """Pixels -> Label Studio's {x, y, width, height} in percent of the original image (exact, rounded once).

    >>> pixels_to_percent(199.4, 150.1, 798.6, 349.2, 1000, 500)
    {'x': 19.94, 'y': 30.02, 'width': 59.92, 'height': 39.82}
    """
    a, b, c, d = (Fraction(v) for v in (x_min, y_min, x_max, y_max))
    W, H = Fraction(image_w), Fraction(image_h)
    return {
        "x": float(a * 100 / W), "y": float(b * 100 / H),
        "width": float((c - a) * 100 / W), "height": float((d - b) * 100 / H),
    }


def region_to_box(
    value: Mapping[str, Any], image_w: int, image_h: int, *, min_size_px: float = 2.0
) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """Validate one Label Studio rectangle `value` against the stored image: (pixel box, None) or (None, reason).

    Rotation is rejected (a rotated rectangle is not an axis-aligned box), a box partly outside the image
    is clamped to it, a box wholly outside or thinner than `min_size_px` is rejected.

    >>> region_to_box({"x": 90, "y": 10, "width": 20, "height": 50, "rotation": 0}, 200, 100)
    ((180.0, 10.0, 200.0, 60.0), None)
    >>> region_to_box({"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 30}, 200, 100)
    (None, 'rotated by 30 degrees; draw an axis-aligned box')
    """
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
        rotation = float(value.get("rotation", 0) or 0)
    except (KeyError, TypeError, ValueError):
        return None, f"malformed rectangle {dict(value)!r}: needs numeric x, y, width, height"
    if not all(math.isfinite(v) for v in (x, y, w, h, rotation)):
        return None, "non-finite coordinates"
    if image_w <= 0 or image_h <= 0:
        return None, f"stored image has no size ({image_w}x{image_h})"
    if abs(rotation % 360) > 1e-6 and abs(rotation % 360 - 360) > 1e-6:
        return None, f"rotated by {rotation:g} degrees; draw an axis-aligned box"
    if w < 0:  # a drag to the left can come back with negative extent
        x, w = x + w, -w
    if h < 0:
        y, h = y + h, -h
    x0, y0, x1, y1 = percent_to_pixels(x, y, w, h, image_w, image_h)
    if x1 <= 0 or y1 <= 0 or x0 >= image_w or y0 >= image_h:
        return None, f"outside the {image_w}x{image_h} image"
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(image_w)), min(y1, float(image_h))
    if cx1 - cx0 < min_size_px or cy1 - cy0 < min_size_px:
        return None, f"degenerate: {cx1 - cx0:.2f}x{cy1 - cy0:.2f} px after clamping (minimum {min_size_px:g} px)"
    return (cx0, cy0, cx1, cy1), None


def extreme_points_to_box(
    points: Iterable[Mapping[str, Any]], image_w: int, image_h: int, *, min_size_px: float = 2.0
) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """Four extreme clicks (Papadopoulos et al., ICCV 2017: the top-, bottom-, left- and right-most points of the
    object, Label Studio keypoints in percent of the original image) -> (pixel box, None) or (None, reason).

    The box is the points' bounding box: the left- and right-most clicks give x_min and x_max, the top- and
    bottom-most y_min and y_max, whatever order they were clicked in. Exactly four points are needed; points
    outside the image are clamped to it; a box thinner than `min_size_px` (points on a line, one click repeated)
    is rejected.

    >>> extreme_points_to_box([{"x": 50, "y": 10}, {"x": 20, "y": 50}, {"x": 50, "y": 90}, {"x": 80, "y": 40}], 200, 100)
    ((40.0, 10.0, 160.0, 90.0), None)
    >>> extreme_points_to_box([{"x": 50, "y": 10}, {"x": 20, "y": 50}], 200, 100)
    (None, '2 points clicked; click exactly 4 extreme points (top, bottom, left, right)')
    """
    pts = list(points)
    if len(pts) != 4:
        return None, f"{len(pts)} points clicked; click exactly 4 extreme points (top, bottom, left, right)"
    if image_w <= 0 or image_h <= 0:
        return None, f"stored image has no size ({image_w}x{image_h})"
    try:
        xy = [(Fraction(float(p["x"])) * image_w / 100, Fraction(float(p["y"])) * image_h / 100) for p in pts]
    except (KeyError, TypeError, ValueError, OverflowError):
        return None, f"malformed point in {pts!r}: needs numeric x and y"
    xs = [min(max(float(x), 0.0), float(image_w)) for x, _ in xy]
    ys = [min(max(float(y), 0.0), float(image_h)) for _, y in xy]
    box = (min(xs), min(ys), max(xs), max(ys))
    if box[2] - box[0] < min_size_px or box[3] - box[1] < min_size_px:
        return None, (f"degenerate: the points span {box[2] - box[0]:.2f}x{box[3] - box[1]:.2f} px "
                      f"(minimum {min_size_px:g} px); click the object's four extreme points")
    return box, None


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (n, 4) and b (m, 4) in (x_min, y_min, x_max, y_max).

    >>> float(iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10]]))[0, 0])
    0.3333333333333333
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


# ------------------------------------------------------------------------------------------ consolidation
@dataclass(frozen=True)
class Cluster:
    box: tuple[float, float, float, float]  # median of the members' coordinates
    members: tuple[int, ...]  # indices into the input


def consolidate(boxes: np.ndarray | Iterable[Iterable[float]], iou_threshold: float = 0.5) -> list[Cluster]:
    """Cluster drawings of the same object by IoU and take the coordinate-wise median of each cluster.

    Greedy medoid clustering (no chaining): the box with the most unassigned neighbours at IoU >=
    threshold seeds a cluster made of it and those neighbours; repeat. Clusters come back largest first,
    ties broken by the lowest member index, so the result does not depend on anything but the input.

    >>> cs = consolidate([[10, 10, 50, 50], [12, 9, 51, 52], [11, 11, 49, 48], [200, 200, 240, 260]])
    >>> [(c.box, c.members) for c in cs]
    [((11.0, 10.0, 50.0, 50.0), (0, 1, 2)), ((200.0, 200.0, 240.0, 260.0), (3,))]
    """
    arr = np.asarray(list(boxes) if not isinstance(boxes, np.ndarray) else boxes, dtype=np.float64).reshape(-1, 4)
    n = len(arr)
    if n == 0:
        return []
    if n == 1:  # the common case (one drawer per task): nothing to cluster
        return [Cluster(tuple(float(v) for v in arr[0]), (0,))]
    near = iou_matrix(arr, arr) >= iou_threshold
    free = np.ones(n, dtype=bool)
    clusters = []
    while free.any():
        counts = (near & free[None, :] & free[:, None]).sum(axis=1)
        counts[~free] = -1
        seed = int(np.argmax(counts))  # argmax takes the first of equals: deterministic
        members = np.flatnonzero(near[seed] & free)
        free[members] = False
        med = np.median(arr[members], axis=0)
        clusters.append(Cluster(tuple(float(v) for v in med), tuple(int(m) for m in members)))
    clusters.sort(key=lambda c: (-len(c.members), c.members[0]))
    return clusters


# ----------------------------------------------------------------------------------------------- tables
def empty_frame(name: str) -> pd.DataFrame:
    return empty_table(name).to_pandas()


def box_id_for(image_id: str, wnid: str, seq: int) -> str:
    """Deterministic id of the box drawn in task `seq` of (image_id, wnid): reruns give the same ids."""
    return "b" + hashlib.sha256(f"{image_id}:{wnid}:{seq}".encode()).hexdigest()[:23]


def request_id_for(image_id: str, wnid: str, seq: int, prefix: str = "box") -> str:
    return f"{prefix}:{image_id}:{wnid}:{seq}"


@dataclass(frozen=True)
class BoxTables:
    """Where one box loop keeps its state, how its request ids start and how it makes a new box. The ILSVRC
    classification boxes use the defaults; the DET loop (every present class of a fully annotated image) keeps its
    own tables and Label Studio projects, so the two never see each other's tasks."""

    tasks: str = "box_tasks"
    answers: str = "box_answers"
    boxes: str = "boxes"
    coverage: str = "coverage"
    request_prefix: str = "box"
    draw_kind: str = "draw"  # draw (drag a rectangle) or extreme (four extreme clicks)
    project_stem: str = "box"  # Label Studio project titles: '<prefix> <stem>-<kind>'

    def __post_init__(self) -> None:
        if self.draw_kind not in DRAW_KINDS:
            raise BoxInputError(f"draw kind {self.draw_kind!r}: expected one of {DRAW_KINDS}")


BOX_TABLES = BoxTables()


def det_box_tables(draw_kind: str = "extreme") -> BoxTables:
    """The DET box loop's tables (det_box_tasks, det_box_answers, det_boxes, det_coverage) and projects."""
    return BoxTables("det_box_tasks", "det_box_answers", "det_boxes", "det_coverage", "detbox", draw_kind, "det-box")


# ------------------------------------------------------------------------------------------- aggregation
Aggregator = Callable[[pd.DataFrame], pd.Series]


def majority_aggregate(votes: pd.DataFrame) -> pd.Series:
    """P(yes) per task as the share of yes votes (a tie is 0.5, which `accept_above=0.5` rejects)."""
    if votes.empty:
        return pd.Series(dtype="float64")
    yes = votes["label"].eq("yes").astype("float64")
    return yes.groupby(votes["task"]).mean()


def qc_aggregator(method: str) -> Aggregator:
    """An aggregator (long frame task, worker, label -> P(yes) per task) backed by pipeline.qc's method classes.

    Any answer other than "yes" (a "no", or a malformed vote the pull recorded as "invalid") counts as "no":
    a broken vote never helps a box through. Without pipeline.qc the loop falls back to plain majority.
    """
    try:
        from pipeline.qc import DawidSkene, MajorityVote
    except ImportError:
        return majority_aggregate

    def aggregate(votes: pd.DataFrame) -> pd.Series:
        if votes.empty:
            return pd.Series(dtype="float64")
        long = votes[["task", "worker", "label"]].assign(label=np.where(votes["label"].eq("yes"), "yes", "no"))
        model = DawidSkene(labels=("no", "yes")) if method == "dawid_skene" else MajorityVote(labels=("no", "yes"))
        return model.fit_predict_proba(long)["yes"]

    return aggregate


# ---------------------------------------------------------------------------------------- state machine
@dataclass
class Action:
    """A task to push for one (image, wnid)."""

    image_id: str
    wnid: str
    seq: int
    kind: str
    overlap: int
    box_id: str | None = None
    shown_box_ids: list[str] = field(default_factory=list)
    prefix: str = "box"

    @property
    def request_id(self) -> str:
        return request_id_for(self.image_id, self.wnid, self.seq, self.prefix)


@dataclass
class PairState:
    image_id: str
    wnid: str
    state: str = "draw"
    waiting: bool = False
    covered: bool = False
    accepted: list[str] = field(default_factory=list)
    n_tasks: int = 0
    n_answers: int = 0
    worker_seconds: float = 0.0
    action: Action | None = None


@dataclass
class Plan:
    actions: pd.DataFrame  # image_id, wnid, seq, kind, overlap, box_id, shown_box_ids, request_id
    boxes: pd.DataFrame  # the `boxes` table
    coverage: pd.DataFrame  # the `coverage` table
    states: dict[tuple[str, str], PairState]


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values (column-wise tolist: far faster than to_dict on Arrow-backed frames)."""
    if not len(frame):
        return []
    cols = list(frame.columns)
    values = [frame[c].tolist() for c in cols]
    return [dict(zip(cols, row, strict=True)) for row in zip(*values, strict=True)]


def _rows_by(frame: pd.DataFrame, key: str) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in records(frame):
        out[row[key]].append(row)
    return out


def _settled(n: int, yes: int, first: int, most: int) -> bool:
    """Votes decide once they are unanimous after the first ask, or once the cap is reached (split votes
    get one more vote at a time: 2 + 1 instead of a fixed 3 saves a third of the verification answers)."""
    return n >= max(first, most) or (n >= first and yes in (0, n))


def _decide_quality(
    tasks: pd.DataFrame, answers_by_task: Mapping[int, list[dict]], frozen: Mapping[str, Any], aggregate: Aggregator,
    policy: BoxesSettings,
) -> dict[str, tuple[float, int, int]]:
    """P(good), n_votes, n_yes for every candidate box whose quality votes are all in and settled, and which has
    no frozen verdict yet.

    The votes of every box not yet frozen are aggregated in one call, so a worker-aware method (Dawid-Skene)
    sees them all at once. Once written to the `boxes` table a verdict is frozen: later re-fits never flip a
    box that later tasks were built on.
    """
    rows = []
    votes: dict[str, list[str]] = defaultdict(list)
    open_boxes: set[str] = set()
    quality = tasks[tasks["kind"] == "quality"] if len(tasks) else tasks
    for t in records(quality[["task_id", "box_id", "overlap"]]):
        if t["box_id"] in frozen:
            continue
        got = answers_by_task.get(t["task_id"], [])
        if len(got) < t["overlap"]:
            open_boxes.add(t["box_id"])
            continue
        got = got[: t["overlap"]]  # extra answers (overlap raised by hand) do not change a decision
        rows += [{"task": t["box_id"], "worker": a["worker"], "label": a["answer"]} for a in got]
        votes[t["box_id"]] += [a["answer"] for a in got]
    settled = {b: (len(v), sum(a == "yes" for a in v)) for b, v in votes.items()
               if b not in open_boxes and _settled(len(v), sum(a == "yes" for a in v), policy.quality_overlap,
                                                   policy.quality_max_votes)}
    if not settled:
        return {}
    proba = aggregate(pd.DataFrame(rows))
    return {b: (float(proba.get(b, 0.0)), n, y) for b, (n, y) in settled.items()}


def _seconds(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def replay_pair(
    image_id: str,
    wnid: str,
    tasks: list[dict[str, Any]],
    answers_by_task: Mapping[int, list[dict[str, Any]]],
    quality: Mapping[str, tuple[float, int, int]],
    frozen: Mapping[str, Mapping[str, Any]],
    policy: BoxesSettings,
    tables: BoxTables = BOX_TABLES,
) -> tuple[PairState, list[dict[str, Any]]]:
    """Replay one pair's tasks in seq order; return its state (with the next action) and its candidate boxes.

    `quality` holds fresh verdicts (P(good), n_votes, n_yes) by box_id, `frozen` the rows already in the
    `boxes` table. Stops at the first task that still waits for answers.
    """
    st = PairState(image_id, wnid)
    boxes: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    draw = tables.draw_kind
    first = {draw: policy.draw_overlap, "quality": policy.quality_overlap, "coverage": policy.coverage_overlap}
    nxt: tuple[str, str | None, int] = (draw, None, first[draw])  # (kind, box_id, overlap) of the next task
    cov_votes: list[str] = []  # coverage votes of the current round (split votes get one more at a time)
    dups = 0  # new boxes in a row that only re-boxed an accepted object since the last coverage round
    for t in sorted(tasks, key=lambda r: r["seq"]):
        st.n_tasks += 1
        got = answers_by_task.get(t["task_id"], [])
        st.n_answers += len(got)
        st.worker_seconds += sum(_seconds(a.get("lead_time_s")) for a in got)
        kind = t["kind"]
        if len(got) < t["overlap"]:
            st.state, st.waiting = kind, True
            return st, boxes
        got = got[: t["overlap"]]
        if kind in DRAW_KINDS:
            drawn = [a for a in got if a["answer"] == "box"]
            if not drawn:
                nxt = (draw, None, first[draw])
                continue
            coords = np.array([[a[c] for c in BOX_COLUMNS] for a in drawn], dtype=np.float64)
            best = consolidate(coords, policy.cluster_iou)[0]
            bid = box_id_for(image_id, wnid, t["seq"])
            row = {
                "box_id": bid, "image_id": image_id, "wnid": wnid,
                **dict(zip(BOX_COLUMNS, best.box, strict=True)),
                "verified": "pending", "drawn_by": ",".join(sorted({drawn[i]["worker"] for i in best.members})),
                "seq": int(t["seq"]), "n_drawn": len(best.members), "n_votes": 0, "n_yes": 0,
                "confidence": None, "reason": None,
            }
            if st.accepted:
                acc = np.array([[by_id[b][c] for c in BOX_COLUMNS] for b in st.accepted])
                ious = iou_matrix(np.array([best.box]), acc)[0]
                if ious.max() >= policy.duplicate_iou:  # not a new object: reject without paying for votes
                    row.update(verified="rejected", reason=f"duplicate of {st.accepted[int(ious.argmax())]}")
            boxes.append(row)
            by_id[bid] = row
            is_dup = row["verified"] == "rejected"
            dups = dups + 1 if is_dup else 0
            if is_dup and dups >= DUPLICATES_TO_RECHECK:
                # workers asked for another object keep boxing ones already boxed: the coverage "no" that sent
                # them was likely wrong, so coverage is asked afresh instead of drawing until max_tasks
                dups, cov_votes = 0, []
                nxt = ("coverage", None, first["coverage"])
            else:
                nxt = (draw, None, first[draw]) if is_dup else ("quality", bid, first["quality"])
        elif kind == "quality":
            row = by_id.get(t["box_id"])
            if row is None:
                raise BoxInputError(
                    f"box_tasks: quality task {t['task_id']} of {image_id}/{wnid} judges box {t['box_id']!r}, which no "
                    "earlier draw task of that pair produced; the box_tasks table was edited by hand or mixed up"
                )
            old = frozen.get(row["box_id"])
            if old is not None:
                row.update({k: old[k] for k in ("verified", "n_votes", "n_yes", "confidence")})
            elif row["box_id"] in quality:
                p, n, y = quality[row["box_id"]]
                row.update(verified="accepted" if p > policy.accept_above else "rejected",
                           n_votes=n, n_yes=y, confidence=p)
            if row["verified"] == "accepted":
                st.accepted.append(row["box_id"])
                cov_votes = []
                nxt = ("coverage", None, first["coverage"])
            elif row["verified"] == "rejected":
                nxt = (draw, None, first[draw])
            else:  # votes split and below the cap: one more vote on the same box
                nxt = ("quality", row["box_id"], 1)
        elif kind == "coverage":
            cov_votes += [a["answer"] for a in got]
            n, yes = len(cov_votes), sum(a == "yes" for a in cov_votes)
            if not _settled(n, yes, policy.coverage_overlap, policy.coverage_max_votes):
                nxt = ("coverage", None, 1)
                continue
            cov_votes = []
            if yes * 2 > n:
                st.state, st.covered = "done", True
                return st, boxes
            nxt = (draw, None, first[draw])
            if len(st.accepted) >= policy.max_boxes:
                st.state = "capped"
                return st, boxes
        else:
            raise BoxInputError(f"box_tasks: task {t['task_id']} has unknown kind {kind!r}; expected one of {KINDS}")
    if st.n_tasks >= policy.max_tasks:
        st.state = "gave_up"
        return st, boxes
    kind, bid, overlap = nxt
    shown = [bid] if kind == "quality" else list(st.accepted)
    st.state = kind
    seq = max((int(t["seq"]) for t in tasks), default=-1) + 1
    st.action = Action(image_id, wnid, seq, kind, overlap, bid, shown, tables.request_prefix)
    return st, boxes


def plan(
    pairs: pd.DataFrame,
    tasks: pd.DataFrame,
    answers: pd.DataFrame,
    boxes: pd.DataFrame | None = None,
    policy: BoxesSettings | None = None,
    aggregate: Aggregator | None = None,
    tables: BoxTables = BOX_TABLES,
) -> Plan:
    """The whole box loop's state from its tables, and what to push next.

    pairs: image_id, wnid (the accepted labels to box); tasks: the `box_tasks` table; answers: the
    `box_answers` table; boxes: the previous `boxes` table (its decided verdicts are frozen).
    """
    policy = policy or BoxesSettings()
    aggregate = aggregate or qc_aggregator(policy.method)
    for name, frame, cols in (("pairs", pairs, ["image_id", "wnid"]), ("box_tasks", tasks, ["task_id", "seq", "kind"]),
                              ("box_answers", answers, ["task_id", "answer", "worker"])):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise BoxInputError(f"{name}: missing columns {missing}; pass the table written by the box stage")
    if len(tasks):
        dup = tasks.duplicated(["image_id", "wnid", "seq"])
        if dup.any():
            r = tasks[dup].iloc[0]
            raise BoxInputError(f"box_tasks: (image_id, wnid, seq) = ({r.image_id}, {r.wnid}, {r.seq}) appears twice; "
                                "remove the later duplicate row (its Label Studio task is a leftover)")
    if len(answers):
        answers = answers.sort_values(["task_id", "annotation_id"] if "annotation_id" in answers else ["task_id"])
    answers_by_task = _rows_by(answers, "task_id")
    frozen = {r["box_id"]: r for r in records(boxes) if r["verified"] in ("accepted", "rejected")} \
        if boxes is not None else {}
    quality = _decide_quality(tasks, answers_by_task, frozen, aggregate, policy)
    tasks_by_pair: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records(tasks):
        tasks_by_pair[(r["image_id"], r["wnid"])].append(r)
    states: dict[tuple[str, str], PairState] = {}
    box_rows: list[dict] = []
    for image_id, wnid in pairs[["image_id", "wnid"]].drop_duplicates().itertuples(index=False):
        st, rows = replay_pair(image_id, wnid, tasks_by_pair.get((image_id, wnid), []), answers_by_task, quality,
                               frozen, policy, tables)
        states[(image_id, wnid)] = st
        box_rows += rows
    acts = [a for a in (s.action for s in states.values()) if a is not None]
    actions = pd.DataFrame(
        [{**{k: getattr(a, k) for k in ("image_id", "wnid", "seq", "kind", "overlap", "box_id", "shown_box_ids")},
          "request_id": a.request_id} for a in acts],
        columns=["image_id", "wnid", "seq", "kind", "overlap", "box_id", "shown_box_ids", "request_id"],
    )
    box_frame = pd.DataFrame(box_rows, columns=[f.name for f in empty_table("boxes").schema]) if box_rows \
        else empty_frame("boxes")
    coverage = pd.DataFrame(
        [{"image_id": s.image_id, "wnid": s.wnid, "state": s.state, "waiting": s.waiting, "covered": s.covered,
          "n_boxes": len(s.accepted), "n_tasks": s.n_tasks, "n_answers": s.n_answers,
          "worker_seconds": s.worker_seconds} for s in states.values()],
        columns=[f.name for f in empty_table("coverage").schema],
    )
    return Plan(actions, box_frame, coverage, states)


def summarize(coverage: pd.DataFrame, boxes: pd.DataFrame) -> dict[str, Any]:
    """Counts for `boxes status` and the benchmarks."""
    n = len(coverage)
    accepted = boxes[boxes["verified"] == "accepted"] if len(boxes) else boxes
    finished = coverage[coverage["state"].isin(TERMINAL)] if n else coverage
    return {
        "pairs": n,
        "by_state": {k: int(v) for k, v in coverage["state"].value_counts().sort_index().items()} if n else {},
        "waiting": int(coverage["waiting"].sum()) if n else 0,
        "finished": len(finished),
        "covered": int(coverage["covered"].sum()) if n else 0,
        "covered_share_of_finished": float(finished["covered"].mean()) if len(finished) else None,
        "boxes_accepted": len(accepted),
        "boxes_rejected": int((boxes["verified"] == "rejected").sum()) if len(boxes) else 0,
        "boxes_pending": int((boxes["verified"] == "pending").sum()) if len(boxes) else 0,
        "tasks": int(coverage["n_tasks"].sum()) if n else 0,
        "answers": int(coverage["n_answers"].sum()) if n else 0,
        "worker_seconds": float(coverage["worker_seconds"].sum()) if n else 0.0,
        "tasks_per_accepted_box": float(coverage["n_tasks"].sum() / len(accepted)) if len(accepted) else None,
        "worker_seconds_per_accepted_box": float(coverage["worker_seconds"].sum() / len(accepted)) if len(accepted) else None,
    }


# ------------------------------------------------------------------------------------------- I/O shell
def pairs_to_box(store: Any, policy: BoxesSettings | None = None) -> pd.DataFrame:
    """(image_id, wnid, width, height, storage_key) of accepted labels on accepted images, sampled per wnid."""
    policy = policy or BoxesSettings()
    labels = store.read_table("labels", missing_ok=True).to_pandas()
    images = store.read_table("images", missing_ok=True).to_pandas()
    labels = labels[labels["status"] == "accepted"][["image_id", "wnid"]]
    images = images[(images["status"] == "accepted") & images["image_id"].notna()]
    images = images.drop_duplicates("image_id")[["image_id", "width", "height", "storage_key"]]
    pairs = labels.merge(images, on="image_id", how="inner").sort_values(["wnid", "image_id"])
    if policy.max_images_per_wnid:
        # a stable sample: the same images stay in whatever else gets accepted later
        pairs = pairs.assign(_h=[hashlib.sha256(i.encode()).hexdigest() for i in pairs["image_id"]])
        pairs = pairs.sort_values(["wnid", "_h"]).groupby("wnid").head(policy.max_images_per_wnid).drop(columns="_h")
    return pairs.reset_index(drop=True)


def run_plan(store: Any, policy: BoxesSettings | None = None, pairs: pd.DataFrame | None = None,
             tables: BoxTables = BOX_TABLES) -> Plan:
    """Read the box tables, replay the loop, write `boxes` and `coverage` (or `tables`' names); return the plan."""
    policy = policy or BoxesSettings()
    pairs = pairs_to_box(store, policy) if pairs is None else pairs
    tasks = store.read_table(tables.tasks, missing_ok=True).to_pandas()
    answers = store.read_table(tables.answers, missing_ok=True).to_pandas()
    boxes = store.read_table(tables.boxes, missing_ok=True).to_pandas()
    result = plan(pairs, tasks, answers, boxes, policy, tables=tables)
    store.write_table(tables.boxes, result.boxes)
    store.write_table(tables.coverage, result.coverage)
    return result


# ------------------------------------------------------------------------------------------------- CLI
def _cmd_status(args: Any, settings: Any) -> int:
    store = store_from_settings(settings)
    coverage = store.read_table("coverage", missing_ok=True).to_pandas()
    boxes = store.read_table("boxes", missing_ok=True).to_pandas()
    summary = summarize(coverage, boxes)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if not len(coverage):
        print(f"no box loop state in {store.url}: run `synsetforge boxes plan` (or the boxes DAG) first")
        return 0
    print(f"store: {store.url}")
    print(f"pairs (image, wnid): {summary['pairs']}   finished: {summary['finished']}   covered: {summary['covered']}")
    print("state counts: " + ", ".join(f"{k} {v}" for k, v in summary["by_state"].items()))
    print(f"boxes: accepted {summary['boxes_accepted']}, rejected {summary['boxes_rejected']}, "
          f"pending {summary['boxes_pending']}")
    if summary["tasks_per_accepted_box"] is not None:
        print(f"tasks per accepted box: {summary['tasks_per_accepted_box']:.2f}   "
              f"worker-seconds per accepted box: {summary['worker_seconds_per_accepted_box']:.1f}")
    per = coverage.groupby("wnid").agg(images=("image_id", "size"), covered=("covered", "sum"), boxes=("n_boxes", "sum"))
    print(per.to_string())
    return 0


def _cmd_plan(args: Any, settings: Any) -> int:
    store = store_from_settings(settings)
    result = run_plan(store, box_settings(settings))
    s = summarize(result.coverage, result.boxes)
    counts = result.actions["kind"].value_counts().to_dict() if len(result.actions) else {}
    print(f"{s['pairs']} pairs, {s['finished']} finished, {s['boxes_accepted']} boxes accepted; "
          f"next tasks: {counts or 'none'}")
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("boxes", help="bounding boxes: draw / quality / coverage loop (ILSVRC)")
    sub = parser.add_subparsers(dest="boxes_command", metavar="SUBCOMMAND")
    p = sub.add_parser("status", help="per-image loop state, coverage and cost per accepted box")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("plan", help="replay box_tasks/box_answers, write boxes and coverage, show the next tasks")
    p.set_defaults(func=_cmd_plan)
    parser.subcommands = sub  # crowd.cli adds `boxes sync` (the Label Studio side) here


__all__ = [
    "Action", "BOX_TABLES", "BoxInputError", "BoxTables", "BoxesSettings", "Cluster", "DRAW_KINDS", "Plan",
    "PairState", "box_id_for", "box_settings", "consolidate", "det_box_tables", "empty_frame", "extreme_points_to_box",
    "iou_matrix", "majority_aggregate", "percent_to_pixels", "pixels_to_percent",
    "plan", "qc_aggregator", "region_to_box", "replay_pair", "request_id_for", "run_plan", "summarize",
]
