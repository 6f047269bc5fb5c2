"""DET without servers: the presence replay, its worker model and decisions, extreme clicks -> boxes, the DET
release with its devkit layout and evaluation (an in-process DET run through the same code the loops run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crowd.presence import parse_presence
from crowd.simulate_presence import Crowd, make_world, run_inprocess, score
from pipeline.boxes import extreme_points_to_box
from pipeline.config import DetSettings
from pipeline.presence import (
    UNKNOWN,
    YES,
    QuestionTree,
    build_question_tree,
    decide_presence,
    fit_presence_model,
    plan_presence,
    state_from_decisions,
)

PERFECT = Crowd(np.ones(30), np.zeros(30, dtype=bool))


def toy_tree() -> QuestionTree:
    # a -> {c1, c2}, b -> {c3, c4}, c5 on its own
    edges = pd.DataFrame([("c1", "a"), ("c2", "a"), ("c3", "b"), ("c4", "b"), ("a", "r"), ("b", "r"), ("c5", "r")],
                         columns=["child_wnid", "parent_wnid"])
    return QuestionTree.from_table(build_question_tree(["c1", "c2", "c3", "c4", "c5"], edges, max_share=0.5))


def task(task_id, image, nodes, *, seq=0, overlap=2, kind=None, gold=(), parent=None):
    return {"task_id": task_id, "project_id": 1, "request_id": f"r{task_id}", "image_id": image, "seq": seq,
            "kind": kind or ("checklist" if len(nodes) > 1 else "question"), "parent_id": parent,
            "node_ids": list(nodes), "is_gold": bool(gold), "gold_answers": list(gold), "overlap": overlap,
            "pushed_at": pd.Timestamp("2026-12-01", tz="UTC")}


def votes_for(task_id, image, answers: dict[str, list[str]], first_ann=1):
    """answers: node -> one answer per worker (worker k answers the k-th entry of every node)."""
    n = len(next(iter(answers.values())))
    rows = []
    for k in range(n):
        for node, a in answers.items():
            rows.append({"annotation_id": first_ann + k, "task_id": task_id, "image_id": image, "node_id": node,
                         "worker": f"w{k}", "answer": a[k], "is_gold": False, "n_items": len(answers),
                         "lead_time_s": 4.0, "submitted_at": pd.Timestamp("2026-12-01", tz="UTC")})
    return rows


def test_a_no_clears_the_subtree_a_yes_opens_a_checklist_and_waiting_tasks_block():
    tree = toy_tree()
    policy = DetSettings(scheme="checklist", initial_votes=3)
    first = plan_presence(tree, ["img"], None, None, policy=policy)
    (a,) = first.actions.itertuples()
    assert a.kind == "checklist" and a.parent_id is None and sorted(a.node_ids) == ["a", "b", "c5"]
    assert a.overlap == 3 and a.request_id == "presence:img:0"
    # pushed, two of three answers in: the image waits, nothing new is asked
    tasks = pd.DataFrame([task(1, "img", a.node_ids, overlap=3)])
    part = votes_for(1, "img", {"a": ["yes", "yes"], "b": ["no", "no"], "c5": ["no", "no"]})
    waiting = plan_presence(tree, ["img"], tasks, pd.DataFrame(part), policy=policy)
    assert waiting.actions.empty and waiting.images.iloc[0]["state"] == "waiting"
    # six unanimous careful answers: a yes (its children asked next), b and c5 no (c3, c4 cleared without a question)
    full = votes_for(1, "img", {"a": ["yes"] * 6, "b": ["no"] * 6, "c5": ["no"] * 6})
    tasks = pd.DataFrame([task(1, "img", a.node_ids, overlap=6)])
    p = plan_presence(tree, ["img"], tasks, pd.DataFrame(full), policy=policy)
    st = p.states["img"]
    assert st.known[tree.index["c3"]] != UNKNOWN and st.known[tree.index["c4"]] != UNKNOWN
    (nxt,) = p.actions.itertuples()
    assert nxt.parent_id == "a" and sorted(nxt.node_ids) == ["c1", "c2"] and nxt.seq == 1
    assert set(p.labels["status"]) == {"accepted", "rejected"}
    # the replay is pure: the same tables give the same plan
    again = plan_presence(tree, ["img"], tasks, pd.DataFrame(full), policy=policy)
    assert again.actions.equals(p.actions) and again.labels.equals(p.labels)


def test_frozen_verdicts_stand_and_decisions_do_not_depend_on_their_order():
    tree = toy_tree()
    # c1 accepted although a was rejected (noisy answers): the "no" is overruled, c2 stays open
    s = state_from_decisions(tree, [tree.index["c1"]], [tree.index["a"]])
    assert s.known[tree.index["a"]] == YES and s.known[tree.index["c2"]] == UNKNOWN
    frozen = pd.DataFrame([{"image_id": "img", "node_id": "c5", "is_class": True, "status": "accepted", "n_votes": 3,
                            "n_yes": 3, "bayes_factor": 1e4, "prior": 0.2, "confidence": 0.999,
                            "method": "presence-ds"}])
    tasks = pd.DataFrame([task(1, "img", ["c5"], overlap=2)])
    against = votes_for(1, "img", {"c5": ["no", "no"]})  # later answers say otherwise: the verdict stays
    p = plan_presence(tree, ["img"], tasks, pd.DataFrame(against), frozen=frozen, policy=DetSettings())
    assert p.labels.set_index("node_id").loc["c5", "status"] == "accepted"


def test_controls_are_mixed_in_three_and_three_per_batch_and_pinned():
    tree = toy_tree()
    gold = pd.DataFrame([{"image_id": f"g{k}", "node_id": n, "answer": "yes" if n in ("a", "c1") else "no",
                          "source": "expert"} for k in range(4) for n in tree.ids])
    policy = DetSettings(scheme="question", questions_per_round=1, gold_batch=2, gold_positives=3, gold_negatives=3)
    p = plan_presence(tree, ["i1", "i2", "i3"], None, None, gold=gold, policy=policy)
    real, ctrl = p.actions[~p.actions["is_gold"]], p.actions[p.actions["is_gold"]]
    assert len(real) == 3 and set(ctrl["image_id"]) <= {f"g{k}" for k in range(4)}
    # ceil(3 / 2) = 2 batches: 6 known positives and 6 known negatives, each a question with its known answer
    assert (ctrl["gold_answers"].map(lambda a: a[0]) == "yes").sum() == 6
    assert (ctrl["gold_answers"].map(lambda a: a[0]) == "no").sum() == 6
    assert ctrl["request_id"].str.startswith("presence-gold:").all()
    assert "g0" not in p.images["image_id"].tolist()  # controls are not dataset images


def test_worker_model_shrinks_sensitivity_toward_the_crowd_and_flags_coin_flippers():
    rng = np.random.default_rng(0)
    rows = []
    truth = rng.random(600) < 0.03  # sparse: a handful of present objects
    for t in range(600):
        for w in rng.choice(40, 5, replace=False):
            spam = w >= 36
            ans = rng.random() < 0.5 if spam else (truth[t] if rng.random() < 0.9 else not truth[t])
            rows.append({"task": f"t{t}", "worker": f"w{w}", "label": "yes" if ans else "no"})
    long = pd.DataFrame(rows)
    fit = fit_presence_model(long, pd.Series(0.03, index=[f"t{t}" for t in range(600)]))
    wt = fit.workers.set_index("worker")
    honest = wt.loc[[f"w{w}" for w in range(36)]]
    assert honest["sensitivity"].between(0.6, 0.99).all()  # a few positives each: no 0 / 1 sensitivities
    assert not honest["flagged"].any()
    # a coin-flipper is flagged, or its answers weigh nothing: sensitivity tied to its (chance) specificity
    spam = wt.loc[[f"w{w}" for w in range(36, 40)]]
    weight = np.abs(np.log(spam["sensitivity"] / (1 - spam["specificity"])))
    assert (spam["flagged"] | (weight < 0.2)).all(), spam
    lbf = fit.log_bf.reindex([f"t{t}" for t in range(600)]).to_numpy()
    assert (lbf[truth] > 0).mean() > 0.9 and (lbf[~truth] < 0).mean() > 0.9


def test_decisions_reject_on_the_bayes_factor_and_accept_on_the_posterior():
    # a rare class: its answers favour presence 50:1, not enough for 0.99 at a 1 % prior, so more answers are asked
    st, conf, more = decide_presence(np.log([50.0, 1 / 400, 1 / 100, 1e5]), np.array([3, 4, 4, 6]), 0.01,
                                     miss_factor=300, step=np.log(4))
    assert st.tolist() == ["pending", "rejected", "pending", "accepted"]
    assert more[0] >= 1 and more[2] >= 1 and more[1] == more[3] == 0
    st, _, _ = decide_presence(np.log([3.0]), np.array([25]), 0.5, max_votes=25)  # at the cap the likelier stands
    assert st.tolist() == ["accepted"]


def test_a_class_miss_budget_is_shared_by_the_questions_above_it():
    t = toy_tree()  # a -> {c1, c2}, b -> {c3, c4}, c5 on its own: two decisions above c1..c4, one for c5
    assert {n: int(t.levels[t.index[n]]) for n in ("a", "b", "c1", "c4", "c5")} == {"a": 2, "b": 2, "c1": 2, "c4": 2,
                                                                                     "c5": 1}
    # 1:400 against presence clears a lone class (300) but not a node with two decisions on its path (600)
    st, _, _ = decide_presence(np.log([1 / 400, 1 / 400]), np.array([4, 4]), 0.05, miss_factor=np.array([300.0, 600.0]))
    assert st.tolist() == ["rejected", "pending"]


def test_extreme_points_and_checklist_answers_parse():
    pts = [{"x": 70, "y": 45}, {"x": 25, "y": 50}, {"x": 55, "y": 80}, {"x": 45, "y": 20}]  # any click order
    box, reason = extreme_points_to_box(pts, 400, 200)
    assert reason is None and box == (100.0, 40.0, 280.0, 160.0)
    box, reason = extreme_points_to_box([{"x": 10, "y": 10}] * 4, 400, 200)
    assert box is None and "degenerate" in reason
    box, _ = extreme_points_to_box([{"x": -5, "y": 50}, {"x": 105, "y": 50}, {"x": 50, "y": 10}, {"x": 50, "y": 90}],
                                   400, 200)
    assert box == (0.0, 20.0, 400.0, 180.0)  # clamped to the image
    assert parse_presence("checklist", [], {"node_ids": ["a", "b"]}) == [("a", "no"), ("b", "no")]
    with pytest.raises(ValueError, match="points past"):
        parse_presence("checklist", [{"from_name": "item_5", "value": {"choices": ["yes"]}}], {"node_ids": ["a"]})


def test_tree_and_checklist_beat_asking_every_class_on_a_simulated_world():
    """The loop itself, end to end in-process: a perfect crowd finds exactly the present classes, and the tree asks
    far fewer questions than there are classes."""
    world = make_world(30, seed=2, n_classes=60)
    res = run_inprocess(world, DetSettings(scheme="checklist", initial_votes=2), seed=2, crowd=PERFECT)
    s = score(world, res)
    assert s["recall"] == 1.0 and s["precision"] == 1.0 and s["done"] == 30
    assert s["questions_per_image"] < 60 / 2
    flat = make_world(30, seed=2, n_classes=60, flat=True)
    f = score(flat, run_inprocess(flat, DetSettings(scheme="question", questions_per_round=100, initial_votes=2),
                                  seed=2, crowd=PERFECT))
    assert f["questions_per_image"] == 60 and f["seconds_per_image"] > 2 * s["seconds_per_image"]


def test_det_release_devkit_layout_and_evaluation(tmp_path):
    from crowd.simulate_presence import run_det_inprocess, write_det_world
    from pipeline.cli import main
    from pipeline.evaluate import evaluate, ground_truth_from_release
    from pipeline.release.det import build_det_release, export_det_devkit
    from pipeline.release.manifest import ReleaseExists, ReleaseInputError, verify_release
    from pipeline.store import open_store

    det13 = ["n02084071", "n02121808", "n02374451", "n02958343", "n02834778", "n02691156", "n03001627",
             "n04379243", "n03614007", "n03793489", "n03782190", "n07753592", "n07739125"]
    (tmp_path / "det.txt").write_text("\n".join(det13) + "\n")
    root = tmp_path / "s"
    assert main(["--store", str(root), "vocab", "--wnid-file", str(tmp_path / "det.txt"), "--det",
                 "--no-multilingual"]) == 0
    store = open_store(root)
    with pytest.raises(ReleaseInputError, match="det_images"):
        build_det_release(store, "too-early")
    truth = write_det_world(store, 12, seed=3)
    run_det_inprocess(store, truth, seed=3, crowd=PERFECT)
    # one image with a present class whose box loop has not finished stays out of the release
    cov = store.read_table("det_coverage").to_pandas()
    held = cov.iloc[0]["image_id"]
    cov.loc[cov["image_id"] == held, ["state", "covered"]] = ["coverage", False]
    store.write_table("det_coverage", cov)
    m = build_det_release(store, "d1", val=4, test=2)
    assert m["task"] == "det" and m["splits"] == {"train": 5, "val": 4, "test": 2}
    assert m["stats"]["boxes_unfinished"] == 1 and m["stats"]["box_kinds"] == ["extreme"]
    assert verify_release(store, "d1").ok
    with pytest.raises(ReleaseExists):
        build_det_release(store, "d1")
    counts = export_det_devkit(store, "d1", tmp_path / "dk")
    assert (counts["train"], counts["val"], counts["test"], counts["xml"]) == (5, 4, 2, 9)
    dk = tmp_path / "dk"
    index = {line.split()[0]: int(line.split()[1]) for line in (dk / "devkit/data/map_det.txt").read_text().splitlines()}
    assert sorted(index) == sorted(det13) and sorted(index.values()) == list(range(1, 14))
    val = (dk / "ImageSets/DET/val.txt").read_text().splitlines()
    assert [int(v.split()[1]) for v in val] == [1, 2, 3, 4]
    assert not list((dk / "Annotations/DET").glob("test/*"))  # test labels are in no file
    labels = store.read_table("det_images").to_pandas().set_index("image_id")
    ids = dict(line.split() for line in (dk / "devkit/data/image_ids.txt").read_text().splitlines())
    for k, w in ((k, w) for w, k in index.items()):
        for line in (dk / f"ImageSets/DET/train_{k}.txt").read_text().splitlines():
            stem, flag = line.split()
            assert (flag == "1") == (w in set(labels.loc[ids[stem], "present"]))
    assert held not in set(ids.values())
    # evaluation on the val split: the true boxes score AP 1, a detection of an absent class only lowers precision
    gt = ground_truth_from_release(store, "d1", "val")
    lines = [f"{gt.order.index(r.image_id) + 1} {r.cls} 0.9 {r.x_min} {r.y_min} {r.x_max} {r.y_max}"
             for r in gt.boxes.itertuples()]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    assert evaluate("det", tmp_path / "p.txt", gt)["mean_ap"] == 1.0
    r = gt.boxes.iloc[0]
    absent = next(c for c in range(1, 14) if not ((gt.boxes["image_id"] == r.image_id) & (gt.boxes["cls"] == c)).any()
                  and (gt.boxes["cls"] == c).any())
    lines.append(f"{gt.order.index(r.image_id) + 1} {absent} 0.95 {r.x_min} {r.y_min} {r.x_max} {r.y_max}")
    (tmp_path / "fp.txt").write_text("\n".join(lines) + "\n")
    res = evaluate("det", tmp_path / "fp.txt", gt)
    assert res["mean_ap"] < 1.0 and res["per_class"][gt.wnids[absent - 1]]["ap"] < 1.0
    assert main(["--store", str(root), "evaluate", "--release", "d1", "--task", "det", "--predictions",
                 str(tmp_path / "p.txt")]) == 0
    assert main(["--store", str(root), "evaluate", "--release", "d1", "--task", "cls", "--predictions",
                 str(tmp_path / "p.txt")]) == 2  # a DET release is scored as detection only
    # a child release keeps its parent's splits
    m2 = build_det_release(store, "d2", parent="d1", val=0.5, test=0.1)
    assert m2["split_policy"]["kept_from_parent"] == 11
