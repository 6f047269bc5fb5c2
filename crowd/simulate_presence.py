"""Simulated DET presence work: a world of images with known present classes, workers who answer whole-image
questions about them, and the presence loop run to the end in-process (no server).

The world: classes under a three-level hierarchy (groups of sub-groups of classes), its question tree built by
`pipeline.presence.build_question_tree` as for a WordNet vocabulary. Images are sparse and correlated: each shows
one of a few scenes; the number of objects is 1 + Poisson(1.8) (about 2.8, ILSVRC-2014 DET val's figure), each
drawn from its scene's typical classes with probability 0.85, else from all classes.

Workers: the crowd model of the QC benchmarks (benchmarks/crowd_cost.py): accuracy ~ Beta(8, 2) per worker, the
same on present and absent objects, 10 % spammers answering at random. A checklist item is answered like a
question about that node. Task times are assumptions of the caller (`QuestionTimes`), not measurements.

`run_inprocess` calls the same `pipeline.presence.plan_presence` the real loop calls, on tables shaped exactly as
the Label Studio pull writes them, so what it measures is the loop, not a model of it.

    >>> world = make_world(20, seed=1, n_classes=40)
    >>> out = run_inprocess(world, seed=1)
    >>> bool((out.images["state"] == "done").all())
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from pipeline.presence import (
    DEFAULT_TIMES,
    QuestionTimes,
    QuestionTree,
    build_question_tree,
    det_settings,
    plan_presence,
)

EPOCH = datetime(2026, 12, 1, tzinfo=UTC)


@dataclass
class World:
    tree: QuestionTree
    questions: pd.DataFrame  # the det_questions table
    image_ids: list[str]  # pool images
    present: np.ndarray  # (images, nodes) bool: node present in the image (classes and their ancestors)
    gold_ids: list[str]  # control images (their truth is known to the loop)
    gold_present: np.ndarray

    def truth_of(self, image_id: str) -> np.ndarray:
        if image_id in self._row:
            return self.present[self._row[image_id]]
        return self.gold_present[self._gold_row[image_id]]

    def __post_init__(self) -> None:
        self._row = {i: k for k, i in enumerate(self.image_ids)}
        self._gold_row = {i: k for k, i in enumerate(self.gold_ids)}

    def gold_table(self) -> pd.DataFrame:
        """presence_gold: every node of every control image (an expert annotated them fully)."""
        rows = [{"image_id": g, "node_id": self.tree.ids[n], "answer": "yes" if self.gold_present[k, n] else "no",
                 "source": "expert"} for k, g in enumerate(self.gold_ids) for n in range(len(self.tree))]
        return pd.DataFrame(rows, columns=["image_id", "node_id", "answer", "source"])


def make_world(n_images: int, seed: int = 0, n_classes: int = 200, n_gold: int = 0, flat: bool = False,
               n_scenes: int = 16) -> World:
    """`n_images` pool images and `n_gold` control images over `n_classes` classes. flat=True: the same images
    and classes with no question nodes (every class asked on its own: the baseline)."""
    rng = np.random.default_rng(seed)
    pairs, classes, k = [], [], 0
    sub = "s0_0"
    for g in range(10):
        for s in range(int(rng.integers(2, 4))):
            sub = f"s{g}_{s}"
            pairs.append((sub, f"g{g}"))
            for _ in range(int(rng.integers(6, 11))):
                if k < n_classes:
                    classes.append(f"c{k:03d}")
                    pairs.append((classes[-1], sub))
                    k += 1
        pairs.append((f"g{g}", "root"))
    while k < n_classes:  # top up the last sub-group
        classes.append(f"c{k:03d}")
        pairs.append((classes[-1], sub))
        k += 1
    edges = pd.DataFrame(pairs, columns=["child_wnid", "parent_wnid"])
    full = QuestionTree.from_table(build_question_tree(classes, edges, max_share=0.5))
    group_of = {int(c): (full.ancestors[c][-1] if full.ancestors[c] else int(c)) for c in full.classes}
    by_group: dict[int, list[int]] = {}
    for c, g in group_of.items():
        by_group.setdefault(g, []).append(c)
    groups = sorted(by_group)
    scenes = []
    for _ in range(n_scenes):
        gs = rng.choice(groups, size=min(len(groups), int(rng.integers(2, 4))), replace=False)
        pool = np.concatenate([by_group[g] for g in gs])
        scenes.append(rng.choice(pool, size=min(12, len(pool)), replace=False))

    def images(n: int) -> np.ndarray:
        present = np.zeros((n, len(full)), dtype=bool)
        for i in range(n):
            scene = scenes[int(rng.integers(len(scenes)))]
            for _ in range(1 + int(rng.poisson(1.8))):
                c = int(rng.choice(scene)) if rng.random() < 0.85 else int(rng.choice(full.classes))
                present[i, c] = True
                present[i, full.ancestors[c]] = True
        return present

    present, gold_present = images(n_images), images(n_gold)
    questions = build_question_tree(classes, edges, max_share=0.5)
    tree = full
    if flat:  # the same classes, no question nodes: every class is a top-level question
        questions = build_question_tree(classes, edges.iloc[:0], max_share=0.5)
        tree = QuestionTree.from_table(questions)
        cols = [full.index[c] for c in tree.ids]
        present, gold_present = present[:, cols], gold_present[:, cols]
    ids = [hashlib.sha256(f"det-{seed}-{i}".encode()).hexdigest() for i in range(n_images)]
    gids = [hashlib.sha256(f"det-gold-{seed}-{i}".encode()).hexdigest() for i in range(n_gold)]
    return World(tree, questions, ids, present, gids, gold_present)


@dataclass(frozen=True)
class Crowd:
    """Worker accuracies (the same for present and absent objects) and spammers."""

    accuracy: np.ndarray
    spammer: np.ndarray

    @classmethod
    def draw(cls, seed: int, n_workers: int = 500, a: float = 8.0, b: float = 2.0, spam: float = 0.10) -> Crowd:
        rng = np.random.default_rng([seed, 7])
        return cls(rng.beta(a, b, n_workers), rng.random(n_workers) < spam)

    def __len__(self) -> int:
        return len(self.accuracy)

    def answer(self, worker: int, truth: bool, rng: np.random.Generator) -> bool:
        if self.spammer[worker]:
            return bool(rng.integers(2))
        return truth if rng.random() < self.accuracy[worker] else not truth


def task_seconds(kind: str, n_items: int, times: QuestionTimes) -> float:
    return times.question if kind == "question" else times.group(n_items)


@dataclass
class SimResult:
    tasks: pd.DataFrame
    votes: pd.DataFrame
    labels: pd.DataFrame
    images: pd.DataFrame
    rounds: int


def run_inprocess(world: World, policy: Any = None, seed: int = 0, crowd: Crowd | None = None,
                  times: QuestionTimes = DEFAULT_TIMES, max_rounds: int = 300, rules: Any = None) -> SimResult:
    """The presence loop to the end with simulated workers: plan -> answer -> plan ... (each round answers every
    pushed task with `overlap` distinct workers who have not answered those nodes of that image before)."""
    policy = policy or det_settings(None)
    crowd = crowd or Crowd.draw(seed)
    rng = np.random.default_rng([seed, 11])
    tree = world.tree
    gold = world.gold_table() if world.gold_ids else None
    task_cols = ["task_id", "project_id", "request_id", "image_id", "seq", "kind", "parent_id", "node_ids", "is_gold",
                 "gold_answers", "overlap", "pushed_at"]
    vote_cols = ["annotation_id", "task_id", "image_id", "node_id", "worker", "answer", "is_gold", "n_items",
                 "lead_time_s", "submitted_at"]
    task_chunks: list[pd.DataFrame] = []
    vote_chunks: list[pd.DataFrame] = []
    tasks = pd.DataFrame(columns=task_cols)
    votes = pd.DataFrame(columns=vote_cols)
    frozen = None
    seen: dict[tuple[str, str], set[int]] = {}
    next_task = next_ann = 1
    result = None
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (reported)
        result = plan_presence(tree, world.image_ids, tasks, votes, frozen, gold, policy, rules=rules, times=times)
        frozen = result.labels
        if result.actions.empty:
            break
        new_t, new_v = [], []
        for a in result.actions.itertuples(index=False):
            nodes = list(a.node_ids)
            truth = world.truth_of(a.image_id)
            new_t.append({"task_id": next_task, "project_id": 0, "request_id": a.request_id, "image_id": a.image_id,
                          "seq": a.seq, "kind": a.kind, "parent_id": a.parent_id, "node_ids": nodes,
                          "is_gold": a.is_gold, "gold_answers": list(a.gold_answers), "overlap": a.overlap,
                          "pushed_at": EPOCH})
            used = set().union(*(seen.get((a.image_id, n), set()) for n in nodes))
            free = np.setdiff1d(np.arange(len(crowd)), np.fromiter(used, dtype=np.int64, count=len(used)))
            who = rng.choice(free, size=min(int(a.overlap), len(free)), replace=False)
            secs = task_seconds(a.kind, len(nodes), times)
            for w in who:
                w = int(w)
                for n in nodes:
                    ans = crowd.answer(w, bool(truth[tree.index[n]]), rng)
                    new_v.append({"annotation_id": next_ann, "task_id": next_task, "image_id": a.image_id,
                                  "node_id": n, "worker": f"w{w:04d}", "answer": "yes" if ans else "no",
                                  "is_gold": a.is_gold, "n_items": len(nodes), "lead_time_s": secs,
                                  "submitted_at": EPOCH})
                    seen.setdefault((a.image_id, n), set()).add(w)
                next_ann += 1
            next_task += 1
        nt, nv = pd.DataFrame(new_t, columns=task_cols), pd.DataFrame(new_v, columns=vote_cols)
        task_chunks.append(nt)
        vote_chunks.append(nv)
        tasks = pd.concat(task_chunks, ignore_index=True)
        votes = pd.concat(vote_chunks, ignore_index=True)
    else:
        raise RuntimeError(f"presence loop did not finish in {max_rounds} rounds")
    assert result is not None
    return SimResult(tasks, votes, result.labels, result.images, rounds)


def score(world: World, result: SimResult) -> dict[str, Any]:
    """Recall and precision of present classes against the truth; questions, answers and seconds per pool image
    (the controls' answers included in the cost)."""
    tree = world.tree
    cls = [tree.ids[c] for c in tree.classes]
    truth = {i: {tree.ids[c] for c in tree.classes if world.present[k, c]} for k, i in enumerate(world.image_ids)}
    found = {r.image_id: set(r.present) for r in result.images.itertuples(index=False)}
    tp = sum(len(truth[i] & found.get(i, set())) for i in truth)
    n_true = sum(len(v) for v in truth.values())
    n_found = sum(len(found.get(i, set())) for i in truth)
    v = result.votes
    secs = float((v["lead_time_s"] / v["n_items"]).sum()) if len(v) else 0.0
    n = len(world.image_ids)
    gold_votes = int(v["is_gold"].sum()) if len(v) else 0
    return {"images": n, "classes": len(cls), "objects_per_image": n_true / n,
            "done": int((result.images["state"] == "done").sum()),
            "recall": tp / max(n_true, 1), "precision": tp / max(n_found, 1),
            "questions_per_image": float(result.images["n_questions"].mean()),
            "tasks_per_image": len(result.tasks) / n, "answers_per_image": len(v) / n,
            "gold_answer_share": gold_votes / max(len(v), 1),
            "seconds_per_image": secs / n, "rounds": result.rounds}


# ------------------------------------------------------------------------- a whole DET run in a store, in-process
@dataclass
class DetTruth:
    """What a simulated DET image set holds: per image the present nodes (classes and their ancestors) and the
    true boxes of each present class."""

    world: World
    boxes: pd.DataFrame  # image_id, wnid, x_min, y_min, x_max, y_max
    pairs: pd.DataFrame  # image_id, wnid, width, height: every present (image, class)

    def present_nodes(self) -> dict[str, set[str]]:
        tree = self.world.tree
        return {i: {tree.ids[n] for n in np.flatnonzero(self.world.truth_of(i))}
                for i in [*self.world.image_ids, *self.world.gold_ids]}


def write_det_world(store: Any, n_images: int, *, seed: int = 0, n_gold: int = 0, max_objects: int = 3,
                    size: tuple[int, int] | None = None) -> DetTruth:
    """Render `n_images` (+ `n_gold` control) images into a store that holds a DET vocabulary (synsets and
    det_questions, from `synsetforge vocab --det`): each shows 1-`max_objects` DET classes (1-2 instances each, as
    coloured shapes), written to the images table as ingest would (image_id = sha256 of the stored bytes); the
    control images' full truth goes to presence_gold. `size`: every image (width, height); default random."""
    from crowd.simulate_boxes import render_image
    from pipeline.boxes import BOX_COLUMNS, iou_matrix
    from pipeline.schemas import arrow_schema

    rng = np.random.default_rng([seed, 5])
    questions = store.read_table("det_questions").to_pandas()
    tree = QuestionTree.from_table(questions)
    classes = tree.classes
    rows, boxes, present_rows, ids = [], [], [], []
    for i in range(n_images + n_gold):
        w, h = size or (int(rng.integers(240, 641)), int(rng.integers(200, 481)))
        chosen = rng.choice(classes, size=int(rng.integers(1, max_objects + 1)), replace=False)
        placed: list[list[float]] = []
        mine = []
        for c in chosen:
            for _ in range(int(rng.integers(1, 3))):
                for _ in range(100):
                    bw, bh = rng.uniform(0.15, 0.35) * w, rng.uniform(0.15, 0.35) * h
                    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                    cand = [x0, y0, x0 + bw, y0 + bh]
                    if not placed or iou_matrix(np.array([cand]), np.array(placed)).max() < 0.05:
                        placed.append(cand)
                        mine.append((tree.ids[c], cand))
                        break
        data = render_image(w, h, np.array([b for _, b in mine]).reshape(-1, 4), seed=seed * 100_003 + i)
        key = store.put_content(data, ".jpg")
        image_id = key.split("/")[-1].split(".")[0]
        ids.append(image_id)
        rows.append({"image_id": image_id, "width": w, "height": h, "format": "JPEG", "n_bytes": len(data),
                     "storage_key": key, "first_url": f"sim://det/{image_id}.jpg", "status": "accepted"})
        p = np.zeros(len(tree), dtype=bool)
        for wnid, b in mine:
            n = tree.index[wnid]
            p[n] = True
            p[tree.ancestors[n]] = True
            boxes.append({"image_id": image_id, "wnid": wnid, **dict(zip(BOX_COLUMNS, b, strict=True))})
        present_rows.append(p)
    cols = arrow_schema("images").names
    store.write_table("images", pd.DataFrame([{c: r.get(c) for c in cols} for r in rows]))
    present = np.array(present_rows, dtype=bool).reshape(-1, len(tree))
    world = World(tree, questions, ids[:n_images], present[:n_images], ids[n_images:], present[n_images:])
    if n_gold:
        store.write_table("presence_gold", world.gold_table())
    truth = pd.DataFrame(boxes, columns=["image_id", "wnid", *BOX_COLUMNS])
    size = {r["image_id"]: (r["width"], r["height"]) for r in rows}
    pairs = truth[truth["image_id"].isin(set(world.image_ids))][["image_id", "wnid"]].drop_duplicates()
    pairs = pairs.assign(width=[size[i][0] for i in pairs["image_id"]], height=[size[i][1] for i in pairs["image_id"]])
    return DetTruth(world, truth, pairs.reset_index(drop=True))


def run_det_inprocess(store: Any, truth: DetTruth, settings: Any = None, *, seed: int = 0, crowd: Crowd | None = None,
                      box_workers: list[Any] | None = None) -> dict[str, Any]:
    """The presence loop, then the DET box loop, with simulated workers and no server; their tables are written to
    `store` as the Label Studio loops would leave them (for release tests and the benchmarks)."""
    from crowd.simulate_boxes import run_inprocess as run_boxes
    from pipeline.boxes import box_settings, det_box_tables

    policy = det_settings(settings)
    res = run_inprocess(truth.world, policy, seed=seed, crowd=crowd)
    store.write_table("presence_tasks", res.tasks)
    store.write_table("presence_votes", res.votes)
    store.write_table("presence_labels", res.labels)
    store.write_table("det_images", res.images)
    done = res.images[res.images["state"] == "done"]
    found = pd.DataFrame([(r.image_id, w) for r in done.itertuples(index=False) for w in r.present],
                         columns=["image_id", "wnid"])
    pairs = truth.pairs.merge(found, on=["image_id", "wnid"], how="right").dropna(subset=["width"])
    missing = found.merge(truth.pairs, on=["image_id", "wnid"], how="left", indicator=True)
    # a class decided present that is not (a false positive): its image's size, no true box
    extra = missing[missing["_merge"] == "left_only"][["image_id", "wnid"]]
    if len(extra):
        size = truth.pairs.drop_duplicates("image_id").set_index("image_id")[["width", "height"]]
        extra = extra.join(size, on="image_id")
        pairs = pd.concat([pairs, extra], ignore_index=True)
    tables = det_box_tables(policy.box_kind)
    boxes = run_boxes(pairs.astype({"width": int, "height": int}), truth.boxes, box_settings(settings),
                      box_workers, seed=seed, tables=tables)
    store.write_table(tables.tasks, boxes.tasks)
    store.write_table(tables.answers, boxes.answers)
    store.write_table(tables.boxes, boxes.boxes)
    store.write_table(tables.coverage, boxes.coverage)
    return {"presence": score(truth.world, res), "box_rounds": boxes.rounds, "pairs": len(pairs)}
