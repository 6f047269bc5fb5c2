"""The challenge without a server: hidden test labels, validation, limits, boards, the Ladder, analysis."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from challenge.analysis import analyse, class_properties, cpl
from challenge.audit import find_test_labels
from challenge.boards import build_board, snapshot
from challenge.db import Submission, read_session
from challenge.scoring import (
    Evaluation,
    SubmissionProblems,
    bootstrap,
    evaluate_submission,
    interval,
    ladder_step,
    read_submission,
)
from challenge.service import ChallengeService, InvalidSubmission, LimitReached, NotRevealed, open_service
from challenge.truth import held_out_from_arrays, load_held_out, partition
from pipeline.release.build import build_release
from pipeline.release.export import export_devkit, export_parquet
from pipeline.release.report import build_report
from pipeline.release.synthetic import make_fixture
from pipeline.store import LocalStore

NOW = datetime(2026, 12, 1, 12, 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with a normal release (public test labels) and a challenge release of the same tables."""
    root = tmp_path_factory.mktemp("challenge-store")
    store = LocalStore(root)
    make_fixture(store, n_classes=4, per_class=16, seed=5, box_fraction=0.9)
    build_release(store, "open1", val_per_class=2, test_per_class=5, neardup=False)
    build_release(store, "c1", parent="open1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    return store


def _phase(**limits):
    return [dict(name="main", opens_at=NOW - timedelta(days=1), closes_at=NOW + timedelta(days=20), **limits)]


@pytest.fixture
def svc(world, tmp_path):
    return ChallengeService(__import__("challenge.db", fromlist=["make_engine"]).make_engine(
        f"sqlite:///{tmp_path / 'c.db'}"), world)


def lines(rows):
    return "".join(" ".join(map(str, r)) + "\n" for r in rows).encode()


# ------------------------------------------------------------------ hidden test labels
def public_files(store, version, tmp_path):
    """Every byte the public side of a release produces: its folder, both exports and the report."""
    build_report(store, version)
    out = {k: store.get(k) for k in store.list(f"releases/{version}")}
    export_devkit(store, version, tmp_path / "devkit", images=True)
    export_parquet(store, version, tmp_path / "parquet")
    for d in ("devkit", "parquet"):
        for p in (tmp_path / d).rglob("*"):
            if p.is_file():
                out[str(p.relative_to(tmp_path))] = p.read_bytes()
    return out


def test_a_challenge_release_publishes_no_test_label_anywhere(world, tmp_path):
    held = load_held_out(world, "c1")
    assert held.n == 20 and len(held.boxes) > 0  # 5 per class, with boxes
    files = public_files(world, "c1", tmp_path / "c1")
    leaks = [f for name, data in files.items() for f in find_test_labels(data, held, name)]
    assert leaks == []
    # the release still lists every test image (without labels), and the devkit export has them all
    assert sorted(pq.read_table(pa.BufferReader(files[next(k for k in files if "test_images-" in k)]))
                  .column("image_id").to_pylist()) == sorted(held.image_ids)
    assert len(list((tmp_path / "c1" / "devkit" / "test").iterdir())) == held.n
    # the scanner finds labels where they are: the same images in the open release, its labels and exports
    open_files = public_files(world, "open1", tmp_path / "open1")
    assert any(find_test_labels(d, held, n) for n, d in open_files.items() if "labels-" in n)
    # the labels are under the private prefix, and the open parent's splits were kept
    assert all(k.startswith("private/releases/c1/") for k in world.list("private"))


def test_a_test_image_stays_a_test_image_in_a_child_release(world):
    build_release(world, "c2", parent="c1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    assert load_held_out(world, "c2").image_ids == load_held_out(world, "c1").image_ids


# ------------------------------------------------------------------ validation and scoring
def test_validation_lists_every_problem_and_refusals_do_not_count(svc, world):
    ch = svc.create_challenge("v", "c1", "loc", _phase(per_week=1))
    team, _ = svc.add_team("t")
    held = svc.held_out("c1")
    w = int(held.widths[0])
    rows = [["1 0 0 5 5"] for _ in range(held.n - 1)]  # one line short
    rows[0] = ["9 0 0 5 5"]  # class index out of range
    rows[1] = ["1 0 0 5 5 " * 6]  # six guesses
    rows[2] = ["1 5 5 2 2"]  # malformed box
    rows[3] = [f"1 0 0 {w + 50} 5"]  # box outside the image
    rows[4] = ["x 0 0 5 5"]
    with pytest.raises(InvalidSubmission) as exc:
        svc.submit("v", team.id, lines(rows), now=NOW)
    kinds = {p["kind"] for p in exc.value.problems}
    assert {"line count", "index out of range", "more than five guesses", "malformed box",
            "box outside the image", "not an integer"} <= kinds
    assert svc.quota("v", team.id, now=NOW)[0].used == 0  # refused: not counted
    good = lines([[f"{t} 0 0 {int(held.widths[i])} {int(held.heights[i])}"] for i, t in enumerate(held.truth)])
    r = svc.submit("v", team.id, good, now=NOW)
    assert r.quota[0].left == 0 and ch.task == "loc"


def test_parquet_submissions_name_unknown_images_and_read_like_text(svc):
    svc.create_challenge("pq", "c1", "cls", _phase(unlimited=True))
    held = svc.held_out("c1")
    team, _ = svc.add_team("p")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_id": held.image_ids + ["f" * 64], "class_index": [1] * (held.n + 1)}), sink)
    with pytest.raises(InvalidSubmission) as exc:
        svc.submit("pq", team.id, sink.getvalue().to_pybytes(), now=NOW)
    assert [p["kind"] for p in exc.value.problems] == ["unknown image"]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_id": held.image_ids, "wnid": [held.wnids[t - 1] for t in held.truth]}), sink)
    a = svc.submit("pq", team.id, sink.getvalue().to_pybytes(), now=NOW)
    b = svc.submit("pq", team.id, lines([[t] for t in held.truth]), now=NOW)
    assert a.shown_score == b.shown_score == 0.0


def test_scores_match_pipeline_evaluate_for_every_task(world):
    held = load_held_out(world, "c1")
    rng = np.random.default_rng(1)
    cls = lines([[t, (t % 4) + 1] if rng.random() < 0.6 else [(t % 4) + 1] for t in held.truth])
    ev = evaluate_submission(read_submission(cls, "cls", held), held)
    assert 0 < ev.headline["top5_error"] < 1
    b = held.boxes
    det = [f"{r.image + 1} {r.cls} {rng.random():.3f} {r.x_min:.1f} {r.y_min:.1f} {r.x_max:.1f} {r.y_max:.1f}"
           for r in b.itertuples() if rng.random() < 0.7]
    det += [f"{k + 1} 1 0.01 0 0 4 4" for k in range(held.n)]
    ed = evaluate_submission(read_submission("\n".join(det).encode(), "det", held), held)
    assert 0 < ed.headline["mean_ap"] < 1  # and evaluate_submission checked it against pipeline.evaluate
    back = Evaluation.from_bytes(ed.to_bytes())
    assert back.score(np.ones(held.n)) == pytest.approx(ed.headline["mean_ap"])
    half = partition(held.image_ids, "salt", 0.5)
    assert half.sum() == 10 and 0 <= back.score(half) <= 1


# ------------------------------------------------------------------ limits, boards, flags
def test_limits_per_window_reset_and_baselines_are_exempt(svc):
    svc.create_challenge("lim", "c1", "cls", _phase(per_day=1, per_week=2))
    held = svc.held_out("c1")
    team, _ = svc.add_team("limited")
    base, _ = svc.add_team("organisers", baseline=True)
    sub = lines([[t] for t in held.truth])
    svc.submit("lim", team.id, sub, now=NOW)
    with pytest.raises(LimitReached) as exc:
        svc.submit("lim", team.id, sub, now=NOW + timedelta(hours=1))
    assert exc.value.window == "day" and exc.value.resets_at == NOW - timedelta(days=1) + timedelta(days=2)
    svc.submit("lim", team.id, sub, now=NOW + timedelta(days=1))  # next day
    with pytest.raises(LimitReached) as exc:
        svc.submit("lim", team.id, sub, now=NOW + timedelta(days=2))
    assert exc.value.window == "week"
    svc.submit("lim", team.id, sub, now=NOW + timedelta(days=6, hours=1))  # the phase's second week
    for _ in range(3):
        svc.submit("lim", base.id, sub, now=NOW)


def test_concurrent_uploads_of_one_team_never_exceed_the_limit(svc):
    svc.create_challenge("race", "c1", "cls", _phase(per_week=3))
    held = svc.held_out("c1")
    team, _ = svc.add_team("racer")
    sub = lines([[t] for t in held.truth])
    outcomes = []

    def go():
        try:
            svc.submit("race", team.id, sub, now=NOW)
            outcomes.append("ok")
        except LimitReached:
            outcomes.append("limit")

    threads = [threading.Thread(target=go) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["limit"] * 9 + ["ok"] * 3
    with read_session(svc.engine) as s:
        assert s.query(Submission).filter(Submission.team_id == team.id).count() == 3


def test_boards_intervals_private_reveal_finals_and_flags(svc, world):
    svc.create_challenge("b", "c1", "cls", _phase(unlimited=True), public_fraction=0.5)
    held = svc.held_out("c1")
    good, _ = svc.add_team("good")
    bad, _ = svc.add_team("bad")
    copy, _ = svc.add_team("copycat")
    base, _ = svc.add_team("baseline", baseline=True)
    perfect = [[t] for t in held.truth]
    wrong = [[t % 4 + 1] for t in held.truth]
    svc.submit("b", good.id, lines(perfect), now=NOW)
    first_bad = svc.submit("b", bad.id, lines(wrong), now=NOW).submission_id
    svc.submit("b", bad.id, lines(perfect[:10] + wrong[10:]), now=NOW)
    svc.submit("b", base.id, lines(wrong), now=NOW)
    r = svc.submit("b", copy.id, lines([p + [1] for p in perfect]), now=NOW)  # the same guesses, one more each
    assert r.flags == [] and svc.flags("b") == []
    r = svc.submit("b", copy.id, lines(perfect), now=NOW)
    assert {f["kind"] for f in r.flags} == {"identical"}
    near, _ = svc.add_team("near")
    r = svc.submit("b", near.id, lines(wrong[:1] + perfect[1:]), now=NOW)  # 19 of 20 lines the same
    assert {f["kind"] for f in r.flags} == {"near-identical"} and min(f["agreement"] for f in r.flags) == 0.95
    assert {f["team"] for f in svc.flags("b")} == {"copycat", "near"}
    board = build_board(svc, "b", now=NOW)
    assert [row.team for row in board.rows][0] in ("good", "copycat") and board.rows[-1].baseline
    assert board.rows[-1].rank is None and all(r.low <= r.score <= r.high for r in board.rows)
    assert board.rows[0].better_than_next is False  # two perfect entries are not distinguishable
    with pytest.raises(NotRevealed):
        build_board(svc, "b", "private", now=NOW)
    svc.select_finals("b", bad.id, [first_bad], now=NOW)
    svc.close("b", now=NOW + timedelta(hours=1))
    private = build_board(svc, "b", "private", now=NOW + timedelta(hours=2))
    by_team = {r.team: r for r in private.rows}
    assert by_team["bad"].submission_id == first_bad and by_team["bad"].score == 1.0
    assert by_team["good"].better_than_next is not None
    snap = snapshot(svc, "b", "private", now=NOW + timedelta(hours=2))
    assert snap["version"] == 2 and world.exists(snap["key"])  # close wrote version 1
    t = pq.read_table(pa.BufferReader(world.get(snap["key"])))
    assert set(t.column("team").to_pylist()) == {"good", "bad", "copycat", "near", "baseline"}


# ------------------------------------------------------------------ bootstrap and the Ladder
def test_bootstrap_interval_width_follows_the_binomial_error():
    n = 20_000
    held = held_out_from_arrays(np.ones(n, dtype=int), 2)
    loss = np.zeros(n, dtype=np.uint8)
    loss[: n // 5] = 1
    ev = Evaluation("cls", {}, loss=loss, scored=np.ones(n, bool), n=n)
    b = bootstrap([ev], np.ones(n, bool), 2000, seed=3)[:, 0]
    assert b.std() == pytest.approx(np.sqrt(0.2 * 0.8 / n), rel=0.1)
    lo, hi = interval(b, 0.999)
    assert lo < 0.2 < hi and hi - lo < 0.03
    assert held.n == n


def test_the_ladder_moves_only_on_a_significant_improvement():
    n = 4000
    rng = np.random.default_rng(0)
    base = (rng.random(n) < 0.3).astype(np.uint8)
    ones = np.ones(n, bool)

    def ev(loss):
        return Evaluation("cls", {}, loss=loss, scored=ones, n=n)

    noisy = base.copy()  # 200 images right that were wrong, 195 wrong that were right: a net 5 is noise
    noisy[np.nonzero(base)[0][:200]] = 0
    noisy[np.nonzero(base == 0)[0][:195]] = 1
    consistent = base.copy()  # only 5 changes, all better: a paired test sees that
    clearly = base.copy()
    clearly[np.nonzero(base)[0][:200]] = 0
    consistent[np.nonzero(base)[0][:5]] = 0
    assert noisy.mean() == consistent.mean() < base.mean()
    assert not ladder_step(ev(noisy), ev(base), ones, float(base.mean()))
    assert ladder_step(ev(consistent), ev(base), ones, float(base.mean()))
    assert ladder_step(ev(clearly), ev(base), ones, float(base.mean()))
    assert ladder_step(ev(base), None, ones, None)


def test_the_boosting_attack_climbs_the_naive_board_but_not_the_ladder(tmp_path):
    from benchmarks.challenge import boosting_attack

    naive = boosting_attack(seed=1, ladder=False, n=2000, k=200, db=f"sqlite:///{tmp_path / 'n.db'}")
    ladder = boosting_attack(seed=1, ladder=True, n=2000, k=200, db=f"sqlite:///{tmp_path / 'l.db'}")
    assert naive["public"] < 0.47 and abs(naive["private"] - 0.5) < 0.04  # the climb, exposed by the private board
    assert ladder["public"] > naive["public"] + 0.02


# ------------------------------------------------------------------ analysis
def test_cpl_counts_ordered_pairs_with_iou_at_least_half():
    same = [0.1, 0.1, 0.5, 0.5]
    boxes = np.array([same, same, [0.12, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    # pairs among the first three overlap (IoU >= 0.5): 3 * 2 ordered pairs of 4 * 3
    assert cpl(boxes) == pytest.approx(6 / 12)
    assert np.isnan(cpl(boxes[:1]))


def test_analysis_relates_per_class_accuracy_to_scale():
    n_cls, per = 6, 30
    truth = np.repeat(np.arange(1, n_cls + 1), per)
    rows = []
    for i, c in enumerate(truth):  # class c's objects cover c / 7 of the image's width and height
        s = c / 7 * 100
        rows.append({"image": i, "cls": int(c), "x_min": 0.0, "y_min": 0.0, "x_max": s, "y_max": s})
    held = held_out_from_arrays(truth, n_cls, boxes=pd.DataFrame(rows), widths=np.full(len(truth), 100.0),
                                heights=np.full(len(truth), 100.0))
    loss = np.array([1 if (i % per) >= per * c / 7 else 0 for i, c in enumerate(truth)], dtype=np.uint8)
    ev = Evaluation("cls", {}, loss=loss, scored=np.ones(len(truth), bool), n=len(truth))
    a = analyse(held, [("team", ev)])
    props = class_properties(held)
    assert props.scale.tolist() == pytest.approx([(c / 7) ** 2 for c in range(1, n_cls + 1)])
    assert props.cpl.tolist() == pytest.approx([1.0] * n_cls)  # every box of a class in the same place
    assert a.correlations["scale"]["pearson"] > 0.9 and set(a.plots) == {"scale", "instances", "cpl"}
    assert a.plots["scale"].startswith("<svg")


def test_open_service_puts_sqlite_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SYNSETFORGE_CHALLENGE_DB", raising=False)
    svc = open_service(str(tmp_path / "data"))
    assert (tmp_path / "data" / "challenge" / "challenge.db").exists() and svc.store is not None
    with pytest.raises(SubmissionProblems):
        read_submission(b"\xff\xfe", "cls", held_out_from_arrays([1], 1))


def test_the_command_line_builds_opens_scores_and_closes_a_challenge(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.delenv("SYNSETFORGE_CHALLENGE_DB", raising=False)
    store = LocalStore(tmp_path / "data")
    make_fixture(store, n_classes=3, per_class=12, seed=8, box_fraction=0.9)
    s = str(tmp_path / "data")
    assert main(["--store", s, "release", "build", "--version", "r1", "--challenge", "--val-per-class", "2",
                 "--test-per-class", "4", "--no-neardup"]) == 0
    held = load_held_out(store, "r1")
    opens = (datetime.utcnow() - timedelta(hours=1)).isoformat(timespec="minutes")
    closes = (datetime.utcnow() + timedelta(days=3)).isoformat(timespec="minutes")
    assert main(["--store", s, "challenge", "create", "r1-cls", "--release", "r1", "--task", "cls",
                 "--phase", f"main/{opens}/{closes}", "--per-day", "1"]) == 0
    assert main(["--store", s, "challenge", "team", "prior", "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "1 per day" in out and "token (shown once" in out
    sub = tmp_path / "prior.txt"
    sub.write_text("".join("1\n" for _ in range(held.n)))
    assert main(["--store", s, "challenge", "submit", "r1-cls", str(sub), "--baseline", "prior"]) == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("7\n")
    assert main(["--store", s, "challenge", "submit", "r1-cls", str(bad), "--baseline", "prior"]) == 2
    err = capsys.readouterr().err
    assert "line count" in err and "index out of range" in err
    assert main(["--store", s, "challenge", "leaderboard", "r1-cls", "--snapshot"]) == 0
    out = capsys.readouterr().out
    assert "prior (baseline)" in out and "99.9 % interval" in out and "snapshot v1" in out
    assert main(["--store", s, "challenge", "leaderboard", "r1-cls", "--private"]) == 2
    assert main(["--store", s, "challenge", "close", "r1-cls"]) == 0
    assert "private board" in capsys.readouterr().out
    assert main(["--store", s, "challenge", "analysis", "r1-cls"]) == 0
    assert "accuracy vs scale" in capsys.readouterr().out


def test_a_detection_challenge_ranks_by_mean_ap_with_intervals(svc):
    svc.create_challenge("det", "c1", "det", _phase(unlimited=True))
    held = svc.held_out("c1")
    good, _ = svc.add_team("sharp")
    poor, _ = svc.add_team("blurry")
    b = held.boxes
    exact = "".join(f"{r.image + 1} {r.cls} 0.9 {r.x_min:.2f} {r.y_min:.2f} {r.x_max:.2f} {r.y_max:.2f}\n"
                    for r in b.itertuples())
    shifted = "".join(f"{r.image + 1} {r.cls} 0.9 {r.x_min:.2f} {r.y_min:.2f} {(r.x_min + r.x_max) / 2:.2f} "
                      f"{(r.y_min + r.y_max) / 2:.2f}\n" for r in b.itertuples())
    assert svc.submit("det", good.id, exact.encode(), now=NOW).shown_score == 1.0
    assert svc.submit("det", poor.id, shifted.encode(), now=NOW).shown_score < 0.5
    board = build_board(svc, "det", now=NOW)
    assert [r.team for r in board.rows] == ["sharp", "blurry"] and not board.lower_is_better
    assert board.rows[0].low <= 1.0 <= board.rows[0].high and board.rows[1].high < 1.0
    svc.close("det", now=NOW + timedelta(hours=1))
    from challenge.analysis import analysis_for

    a = analysis_for(svc, "det", plots=False, now=NOW + timedelta(hours=2))
    assert a.classes["acc:sharp"].dropna().eq(1.0).all() and len(a.classes) == held.n_classes
