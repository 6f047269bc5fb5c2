"""The pure core of the box loop: coordinates, consolidation, the state machine (with restarts), the simulation."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from crowd.simulate_boxes import evaluate, make_truth, run_inprocess
from pipeline.boxes import (
    BoxesSettings,
    BoxInputError,
    box_id_for,
    consolidate,
    empty_frame,
    iou_matrix,
    percent_to_pixels,
    pixels_to_percent,
    plan,
    region_to_box,
    register_cli,
    run_plan,
)
from pipeline.store import LocalStore

T0 = datetime(2026, 11, 26, tzinfo=UTC)
IMG, WNID = "a" * 64, "n02084071"
PAIRS = pd.DataFrame({"image_id": [IMG], "wnid": [WNID], "width": [800], "height": [600]})
# fixed three votes per verification, as in the hand-written scripts below
STRICT = BoxesSettings(quality_overlap=3, quality_max_votes=3, coverage_overlap=3, coverage_max_votes=3)


# ------------------------------------------------------------------------------------------- coordinates
def test_percent_to_pixels_matches_label_studio_example():
    # The drag: x 19.94, y 30.02, w 59.92, h 39.82 (percent of the original) on a 1000x500 image.
    assert percent_to_pixels(19.94, 30.02, 59.92, 39.82, 1000, 500) == (199.4, 150.1, 798.6, 349.2)


def test_percent_pixel_round_trip_is_exact_to_the_last_bit():
    rng = np.random.default_rng(7)
    for w, h in [(1, 1), (333, 777), (4000, 3000), (1023, 17)]:
        for _ in range(300):
            x0, x1 = sorted(rng.uniform(0, w, 2))
            y0, y1 = sorted(rng.uniform(0, h, 2))
            pct = pixels_to_percent(x0, y0, x1, y1, w, h)
            back = percent_to_pixels(pct["x"], pct["y"], pct["width"], pct["height"], w, h)
            assert np.allclose(back, (x0, y0, x1, y1), rtol=0, atol=1e-9 * max(w, h))
            # and each value is the correctly rounded exact product, not an accumulation of float errors
            assert back[0] == float(Fraction(pct["x"]) * w / 100)


def test_region_is_clamped_to_the_image():
    box, reason = region_to_box({"x": -10, "y": 90, "width": 30, "height": 20, "rotation": 0}, 200, 100)
    assert reason is None and box == (0.0, 90.0, 40.0, 100.0)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 15}, "rotated"),
        ({"x": 150, "y": 10, "width": 20, "height": 20}, "outside"),
        ({"x": -50, "y": 10, "width": 20, "height": 20}, "outside"),
        ({"x": 10, "y": 10, "width": 0.2, "height": 20}, "degenerate"),
        ({"x": 99.5, "y": 10, "width": 20, "height": 20}, "degenerate"),  # 1 px left after clamping
        ({"x": "ten", "y": 10, "width": 20, "height": 20}, "malformed"),
        ({"y": 10, "width": 20, "height": 20}, "malformed"),
        ({"x": float("nan"), "y": 10, "width": 20, "height": 20}, "non-finite"),
    ],
)
def test_bad_regions_are_rejected_with_a_reason(value, needle):
    box, reason = region_to_box(value, 200, 100, min_size_px=2)
    assert box is None and needle in reason


def test_rotation_of_a_full_turn_is_not_a_rotation_and_negative_drag_is_normalised():
    box, reason = region_to_box({"x": 30, "y": 40, "width": -20, "height": -10, "rotation": 360}, 100, 100)
    assert reason is None and box == (10.0, 30.0, 30.0, 40.0)


# ----------------------------------------------------------------------------------------- consolidation
def test_iou_known_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]])
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    assert m[0, 0] == 1.0 and m[0, 1] == pytest.approx(25 / 175) and m[0, 2] == 0.0


def test_consolidate_takes_the_median_and_ignores_one_sloppy_drawing():
    boxes = [[100, 100, 200, 200], [102, 98, 201, 203], [99, 101, 198, 199], [75, 75, 225, 225]]  # last is loose
    clusters = consolidate(boxes, 0.3)
    # all four overlap at IoU >= 0.3, the median stays on the three tight ones
    assert clusters[0].members == (0, 1, 2, 3)
    assert clusters[0].box == (99.5, 99.0, 200.5, 201.5)


def test_consolidate_separates_two_objects_and_an_outlier():
    boxes = [[0, 0, 10, 10], [50, 50, 90, 90], [1, 0, 11, 10], [51, 49, 90, 91], [0, 1, 10, 11], [200, 0, 210, 5]]
    clusters = consolidate(boxes, 0.5)
    assert [c.members for c in clusters] == [(0, 2, 4), (1, 3), (5,)]
    assert clusters[0].box == (0.0, 0.0, 10.0, 10.0)
    assert clusters[1].box == (50.5, 49.5, 90.0, 90.5)


def test_consolidate_does_not_chain():
    # A~B, B~C, C~D at IoU 0.67 but A and D far apart: a connected-components clustering would merge all four
    # and take a median over two different extents; the seed's neighbourhood keeps clusters compact.
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10], [6, 0, 16, 10]])
    assert iou_matrix(boxes[:1], boxes[2:3])[0, 0] < 0.5
    clusters = consolidate(boxes, 0.5)
    assert [c.members for c in clusters] == [(0, 1, 2), (3,)]
    assert clusters[0].box == (2.0, 0.0, 12.0, 10.0)


def test_consolidate_empty_and_single():
    assert consolidate([]) == []
    assert consolidate([[1, 2, 3, 4]])[0].box == (1.0, 2.0, 3.0, 4.0)


# ---------------------------------------------------------------------------------------- state machine
class Tables:
    """Hand-built box_tasks / box_answers, the way push and pull append them."""

    def __init__(self):
        self.tasks: list[dict] = []
        self.answers: list[dict] = []

    def push(self, action: dict) -> int:
        tid = 100 + len(self.tasks)
        self.tasks.append({"task_id": tid, "project_id": 1, "request_id": action["request_id"], "image_id": action["image_id"],
                           "wnid": action["wnid"], "seq": action["seq"], "kind": action["kind"], "box_id": action["box_id"],
                           "shown_box_ids": list(action["shown_box_ids"]), "overlap": action["overlap"], "pushed_at": T0})
        return tid

    def answer(self, tid: int, answer: str, box=None, worker: str | None = None, reason=None, seconds=10.0):
        task = next(t for t in self.tasks if t["task_id"] == tid)
        x0, y0, x1, y1 = box if box is not None else (None,) * 4
        self.answers.append({"annotation_id": 1000 + len(self.answers), "task_id": tid, "image_id": task["image_id"],
                             "wnid": task["wnid"], "kind": task["kind"], "worker": worker or f"w{len(self.answers)}",
                             "answer": answer, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1,
                             "reject_reason": reason, "lead_time_s": seconds, "submitted_at": T0})

    def frames(self):
        t = pd.DataFrame(self.tasks, columns=list(empty_frame("box_tasks").columns)) if self.tasks else empty_frame("box_tasks")
        a = pd.DataFrame(self.answers, columns=list(empty_frame("box_answers").columns)) if self.answers \
            else empty_frame("box_answers")
        return t, a


def step(tables: Tables, boxes=None, policy=None, pairs=PAIRS):
    t, a = tables.frames()
    return plan(pairs, t, a, boxes, policy or STRICT)


def only_action(p) -> dict:
    assert len(p.actions) == 1, p.actions
    return p.actions.iloc[0].to_dict()


def test_full_loop_draw_quality_coverage_done():
    tb = Tables()
    p = step(tb)
    a = only_action(p)
    assert (a["kind"], a["seq"], list(a["shown_box_ids"])) == ("draw", 0, [])
    tid = tb.push(a)
    p = step(tb)  # pushed, not answered: waiting, nothing new to push
    assert p.actions.empty and p.coverage.iloc[0]["state"] == "draw" and bool(p.coverage.iloc[0]["waiting"])
    tb.answer(tid, "box", (10, 20, 110, 220), worker="drawer")
    p = step(tb)
    a = only_action(p)
    bid = box_id_for(IMG, WNID, 0)
    assert (a["kind"], a["seq"], a["box_id"], list(a["shown_box_ids"]), a["overlap"]) == ("quality", 1, bid, [bid], 3)
    assert p.boxes.iloc[0]["verified"] == "pending" and p.boxes.iloc[0]["drawn_by"] == "drawer"
    q = tb.push(a)
    tb.answer(q, "yes")
    tb.answer(q, "no")
    p = step(tb)
    assert p.actions.empty  # 2 of 3 votes: still waiting
    tb.answer(q, "yes")
    p = step(tb)
    a = only_action(p)
    assert (a["kind"], list(a["shown_box_ids"])) == ("coverage", [bid])
    row = p.boxes.iloc[0]
    assert (row["verified"], row["n_votes"], row["n_yes"]) == ("accepted", 3, 2)
    assert (row["x_min"], row["y_min"], row["x_max"], row["y_max"]) == (10, 20, 110, 220)
    c = tb.push(a)
    for ans in ("yes", "yes", "no"):
        tb.answer(c, ans)
    p = step(tb)
    assert p.actions.empty
    cov = p.coverage.iloc[0]
    assert (cov["state"], bool(cov["covered"]), cov["n_boxes"], cov["n_tasks"], cov["n_answers"]) == ("done", True, 1, 3, 7)
    assert cov["worker_seconds"] == pytest.approx(70.0)


def drive(tb: Tables, script: list, policy=None):
    """Apply a script of (expected kind, answers) steps; return the last plan."""
    p = step(tb, policy=policy)
    for kind, answers in script:
        a = only_action(p)
        assert a["kind"] == kind, (a, kind)
        tid = tb.push(a)
        for ans in answers:
            if isinstance(ans, tuple):
                tb.answer(tid, "box", ans)
            else:
                tb.answer(tid, ans)
        p = step(tb, policy=policy)
    return p


def test_rejected_box_is_redrawn_and_coverage_no_asks_for_another_box():
    tb = Tables()
    p = drive(tb, [
        ("draw", [(0, 0, 50, 50)]),
        ("quality", ["no", "no", "yes"]),  # rejected -> redraw
        ("draw", [(0, 0, 40, 40)]),
        ("quality", ["yes", "yes", "yes"]),
        ("coverage", ["no", "no", "yes"]),  # another object
    ])
    a = only_action(p)
    first, accepted = box_id_for(IMG, WNID, 0), box_id_for(IMG, WNID, 2)
    assert (a["kind"], a["seq"], list(a["shown_box_ids"])) == ("draw", 5, [accepted])
    verdicts = dict(zip(p.boxes["box_id"], p.boxes["verified"], strict=True))
    assert verdicts == {first: "rejected", accepted: "accepted"}


def test_invalid_drawing_is_redrawn_and_duplicate_is_rejected_without_votes():
    tb = Tables()
    p = drive(tb, [
        ("draw", ["invalid"]),  # e.g. rotated: pull stored answer=invalid with a reason
        ("draw", [(100, 100, 300, 300)]),
        ("quality", ["yes", "yes", "no"]),
        ("coverage", ["no", "no", "no"]),
        ("draw", [(102, 99, 301, 298)]),  # the same object again
    ])
    a = only_action(p)
    assert a["kind"] == "draw" and a["seq"] == 5  # no quality task was spent on the duplicate
    dup = p.boxes[p.boxes["seq"] == 4].iloc[0]
    assert dup["verified"] == "rejected" and dup["reason"].startswith("duplicate of ") and dup["n_votes"] == 0


def test_two_duplicates_in_a_row_ask_coverage_again_instead_of_drawing_until_max_tasks():
    tb = Tables()
    p = drive(tb, [
        ("draw", [(100, 100, 300, 300)]),
        ("quality", ["yes", "yes", "yes"]),
        ("coverage", ["no", "no", "yes"]),  # wrong: the only object is boxed
        ("draw", [(102, 99, 301, 298)]),  # the same object again: one more try
        ("draw", [(99, 101, 299, 302)]),  # again: the coverage "no" is doubted
    ])
    a = only_action(p)
    assert (a["kind"], a["seq"], a["overlap"]) == ("coverage", 5, STRICT.coverage_overlap)
    p = drive(tb, [("coverage", ["yes", "yes", "yes"])])
    assert p.actions.empty and p.coverage.iloc[0]["state"] == "done" and p.coverage.iloc[0]["covered"]
    assert (p.boxes["verified"] == "accepted").sum() == 1


def test_split_votes_get_one_more_vote_unanimous_ones_do_not():
    tb = Tables()
    p = drive(tb, [("draw", [(0, 0, 50, 50)]), ("quality", ["yes", "no"])], policy=BoxesSettings())
    a = only_action(p)  # 1-1: a tie-break vote on the same box
    assert (a["kind"], a["overlap"], a["box_id"]) == ("quality", 1, box_id_for(IMG, WNID, 0))
    assert p.boxes.iloc[0]["verified"] == "pending"
    p = drive(tb, [("quality", ["yes"]), ("coverage", ["yes", "yes"])], policy=BoxesSettings())
    row = p.boxes.iloc[0]
    assert (row["verified"], row["n_votes"], row["n_yes"]) == ("accepted", 3, 2)
    assert p.actions.empty and p.coverage.iloc[0]["state"] == "done"  # 2 unanimous coverage votes suffice
    assert p.coverage.iloc[0]["n_answers"] == 1 + 3 + 2
    tb = Tables()
    p = drive(tb, [("draw", [(0, 0, 50, 50)]), ("quality", ["no", "no"]), ("draw", [(0, 0, 40, 40)]),
                   ("quality", ["yes", "yes"]), ("coverage", ["yes", "no"]), ("coverage", ["no"])],
              policy=BoxesSettings())
    a = only_action(p)
    assert (a["kind"], a["overlap"]) == ("draw", 1) and p.boxes["verified"].tolist() == ["rejected", "accepted"]


def test_caps_stop_the_loop():
    tb = Tables()
    capped = drive(tb, [("draw", [(0, 0, 50, 50)]), ("quality", ["yes"] * 3), ("coverage", ["no"] * 3)],
                   policy=STRICT.model_copy(update={"max_boxes": 1}))
    assert capped.actions.empty and capped.coverage.iloc[0]["state"] == "capped"
    assert not capped.coverage.iloc[0]["covered"]
    tb = Tables()
    p = drive(tb, [("draw", ["invalid"])] * 3, policy=STRICT.model_copy(update={"max_tasks": 3}))
    assert p.actions.empty and p.coverage.iloc[0]["state"] == "gave_up"


def test_consolidates_several_drawers_of_one_task():
    tb = Tables()
    p = step(tb, policy=BoxesSettings(draw_overlap=3))
    tid = tb.push(only_action(p))
    for b in [(10, 10, 50, 50), (12, 8, 52, 51), (300, 300, 320, 330)]:
        tb.answer(tid, "box", b)
    p = step(tb, policy=BoxesSettings(draw_overlap=3))
    row = p.boxes.iloc[0]
    assert (row["x_min"], row["y_min"], row["x_max"], row["y_max"], row["n_drawn"]) == (11, 9, 51, 50.5, 2)
    assert row["drawn_by"] == "w0,w1"


def test_state_survives_restarts_through_the_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    tb = Tables()
    first = run_plan(store, pairs=PAIRS)
    assert run_plan(store, pairs=PAIRS).actions.equals(first.actions)  # rerun without news: same plan
    tid = tb.push(only_action(first))
    tb.answer(tid, "box", (5, 5, 105, 105))
    t, a = tb.frames()
    store.write_table("box_tasks", t)
    store.write_table("box_answers", a)
    # a fresh process: nothing in memory, everything from the tables
    p = run_plan(store, pairs=PAIRS)
    assert only_action(p)["kind"] == "quality"
    assert store.read_table("boxes").num_rows == 1 and store.read_table("coverage").num_rows == 1
    before = store.read_table("boxes")
    run_plan(store, pairs=PAIRS)
    assert store.read_table("boxes").equals(before)  # idempotent: same rows


def test_decided_verdicts_are_frozen_against_a_changing_aggregate():
    tb = Tables()
    p = drive(tb, [("draw", [(0, 0, 50, 50)])])
    q = tb.push(only_action(p))
    for ans in ("yes", "yes", "no"):
        tb.answer(q, ans)
    t, a = tb.frames()
    first = plan(PAIRS, t, a, None, STRICT, aggregate=lambda v: pd.Series(0.9, index=v["task"].unique()))
    assert first.boxes.iloc[0]["verified"] == "accepted"
    # a re-fit that would now reject the box (e.g. Dawid-Skene after more votes) does not flip it: the
    # coverage task already pushed was built on it
    again = plan(PAIRS, t, a, first.boxes, STRICT, aggregate=lambda v: pd.Series(0.1, index=v["task"].unique()))
    assert again.boxes.iloc[0]["verified"] == "accepted" and only_action(again)["kind"] == "coverage"


def test_bad_tables_are_refused_with_the_reason():
    tb = Tables()
    p = step(tb)
    tb.push(only_action(p))
    tb.push(only_action(p))  # the same seq twice: a leftover task
    t, a = tb.frames()
    with pytest.raises(BoxInputError, match="appears twice"):
        plan(PAIRS, t, a, policy=STRICT)
    with pytest.raises(BoxInputError, match="missing columns"):
        plan(PAIRS.drop(columns="wnid"), empty_frame("box_tasks"), empty_frame("box_answers"))
    bad = Tables()
    bad.push({"request_id": "r", "image_id": IMG, "wnid": WNID, "seq": 0, "kind": "quality", "box_id": "bnope",
              "shown_box_ids": [], "overlap": 1})
    bad.answer(100, "yes")
    t, a = bad.frames()
    with pytest.raises(BoxInputError, match="no earlier draw task"):
        plan(PAIRS, t, a)


def test_bad_tables_lose_nothing_and_the_cli_says_what_to_do(tmp_path, capsys):
    from pipeline.errors import UserError

    store = LocalStore(tmp_path / "store")
    tb = Tables()
    first = run_plan(store, pairs=PAIRS)
    tb.push(only_action(first))
    tb.push(only_action(first))
    t, a = tb.frames()
    store.write_table("box_tasks", t)
    before = store.table_version("coverage")
    with pytest.raises(BoxInputError, match="appears twice"):
        run_plan(store, pairs=PAIRS)
    assert store.table_version("coverage") == before  # nothing written on refusal
    settings = argparse.Namespace(store=argparse.Namespace(url=str(store.root), s3_endpoint_url=None))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["boxes", "plan"])
    with pytest.raises(UserError, match="remove the later duplicate row"):
        args.func(args, settings)


# ------------------------------------------------------------------------------------------------ simulation
def test_seeded_simulation_reaches_ilsvrc_like_quality_and_is_reproducible():
    pairs, truth = make_truth(40, seed=11)
    r1 = run_inprocess(pairs, truth, seed=11)
    r2 = run_inprocess(pairs, truth, seed=11)
    pd.testing.assert_frame_equal(r1.boxes, r2.boxes)
    assert r1.coverage["state"].isin(["done", "capped", "gave_up"]).all()
    m = evaluate(r1.coverage, r1.boxes, truth)
    assert m["tight_share"] >= 0.95
    assert m["truly_covered_share"] >= 0.9
    assert m["boxes_accepted"] >= 0.9 * len(truth)
    assert 3 <= m["tasks_per_accepted_box"] < 6  # draw + quality + coverage, plus some redraws
    # the simulation's answers take the same conversion path the pull does: some drawings are rejected
    assert (r1.answers["answer"] == "invalid").sum() >= 0


def test_simulated_sloppy_and_wrong_drawings_are_filtered_by_quality_votes():
    from crowd.simulate_boxes import WorkerProfile

    sloppy = [WorkerProfile(f"s{i}", p_sloppy=0.5, p_wrong=0.2, quality_error=0.02, coverage_error=0.02) for i in range(5)]
    pairs, truth = make_truth(30, seed=5)
    r = run_inprocess(pairs, truth, workers=sloppy, seed=5)
    m = evaluate(r.coverage, r.boxes, truth)
    assert (r.boxes["verified"] == "rejected").sum() >= 10  # many drawings were bad ...
    assert m["tight_share"] >= 0.95  # ... and almost none of them got through


# ------------------------------------------------------------------------------------------------------ CLI
def test_status_command(tmp_path, capsys):
    store = LocalStore(tmp_path / "store")
    settings = argparse.Namespace(store=argparse.Namespace(url=str(store.root), s3_endpoint_url=None))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["boxes", "status"])
    assert args.func(args, settings) == 0
    assert "boxes plan" in capsys.readouterr().out  # empty store: says what to run
    pairs, truth = make_truth(6, seed=2)
    r = run_inprocess(pairs, truth, seed=2)
    store.write_table("boxes", r.boxes)
    store.write_table("coverage", r.coverage)
    args = parser.parse_args(["boxes", "status"])
    assert args.func(args, settings) == 0
    out = capsys.readouterr().out
    assert f"pairs (image, wnid): {len(pairs)}" in out and "tasks per accepted box" in out
    args = parser.parse_args(["boxes", "status", "--json"])
    args.func(args, settings)
    import json

    assert json.loads(capsys.readouterr().out)["boxes_accepted"] == int((r.boxes["verified"] == "accepted").sum())


