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
from pipeline.errors import UserError
from pipeline.release.build import HiddenLabelLeak, build_release
from pipeline.release.export import export_devkit, export_parquet
from pipeline.release.manifest import ReleaseInputError, read_release_table, release_exists
from pipeline.release.report import build_report
from pipeline.release.synthetic import make_fixture
from pipeline.store import LocalStore

NOW = datetime(2026, 12, 1, 12, 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with one challenge release, as ILSVRC published one: train and val public, test labels hidden."""
    root = tmp_path_factory.mktemp("challenge-store")
    store = LocalStore(root)
    make_fixture(store, n_classes=4, per_class=16, seed=5, box_fraction=0.9)
    build_release(store, "c1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
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


def every_public_byte(store, tmp_path):
    """Every public byte of the store: every file of every release (report and card written first), both exports
    of every release, and the board snapshots under challenges/. Nothing under private/."""
    from pipeline.release.manifest import list_releases

    out = {}
    for version in list_releases(store):
        out.update({f"{version}:{k}": v for k, v in public_files(store, version, tmp_path / version).items()})
    out.update({k: store.get(k) for k in store.list("releases")})  # anything else under releases/, too
    out.update({k: store.get(k) for k in store.list("challenges")})
    return out


def leaks_in(files, held):
    return [f for name, data in files.items() for f in find_test_labels(data, held, name)]


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
    # the labels are under the private prefix, where the scanner finds every one of them (it is not blind)
    assert all(k.startswith("private/releases/c1/") for k in world.list("private"))
    private = next(k for k in world.list("private/releases/c1") if "test_labels-" in k)
    assert len(find_test_labels(world.get(private), held, private)) >= held.n


def test_a_test_image_stays_a_test_image_in_a_child_release(world):
    build_release(world, "c2", parent="c1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    assert load_held_out(world, "c2").image_ids == load_held_out(world, "c1").image_ids


def test_no_build_publishes_a_label_that_a_challenge_hides(world):
    held = load_held_out(world, "c1")
    # an open child of the challenge would keep its test images in test and publish their labels
    with pytest.raises(HiddenLabelLeak, match=r"would publish the labels of 20 images .*'c1' \(20\)") as exc:
        build_release(world, "open-child", parent="c1", val_per_class=2, test_per_class=5, neardup=False)
    assert set(exc.value.images) == set(held.image_ids) and isinstance(exc.value, UserError)
    with pytest.raises(HiddenLabelLeak, match="would publish the labels of"):  # no parent: same tables, same salt
        build_release(world, "open-fresh", val_per_class=2, test_per_class=5, neardup=False)
    with pytest.raises(ReleaseInputError, match="for challenge builds"):
        build_release(world, "open-x", parent="c1", val_per_class=2, test_per_class=5, neardup=False, fresh_test=True)
    for v in ("open-child", "open-fresh", "open-x"):  # nothing was written
        assert not release_exists(world, v) and world.list(f"releases/{v}") == []


def _more_images(store, seed):
    """Images collected after a release: a second fixture of the same classes (its blobs copied into `store`),
    returned as rows to add to the store's input tables."""
    import shutil

    other = LocalStore(store.root.parent / f"{store.root.name}-more-{seed}")
    make_fixture(other, n_classes=4, per_class=16, seed=seed, box_fraction=0.9)
    shutil.copytree(other.root / "blobs", store.root / "blobs", dirs_exist_ok=True)
    return {name: other.read_table(name) for name in ("images", "labels", "boxes", "candidates")}


def test_the_command_line_builds_a_challenge_on_an_open_release_from_new_images_only(tmp_path, capsys):
    from pipeline.cli import main

    store = LocalStore(tmp_path / "data")
    make_fixture(store, n_classes=4, per_class=12, seed=9, box_fraction=0.5)
    s = str(tmp_path / "data")
    split = ["--val-per-class", "2", "--test-per-class", "3", "--no-neardup", "--no-report"]
    assert main(["--store", s, "release", "build", "--version", "2026.1", *split]) == 0
    cmd = ["--store", s, "release", "build", "--version", "2026.1c", "--parent", "2026.1", "--challenge", *split]
    assert main(cmd) == 2
    assert "would hide 12 of its 12 test images whose labels are already public" in capsys.readouterr().err
    for name, rows in _more_images(store, seed=10).items():  # a later collection round: new images, labelled
        store.write_table(name, pa.concat_tables([store.read_table(name), rows]))
    assert main(cmd) == 2  # still refused: the salted split would keep 2026.1's test images in test
    assert main([*cmd, "--fresh-test"]) == 0
    held = load_held_out(store, "2026.1c")
    published = read_release_table(store, "2026.1", "labels").column("image_id").to_pylist()
    assert held.n == 12 and not set(held.image_ids) & set(published)
    assert main(["--store", s, "release", "build", "--version", "2026.2", "--parent", "2026.1c", *split]) == 2
    assert "would publish the labels of 12 images that a challenge release hides" in capsys.readouterr().err


def test_a_challenge_on_an_open_release_hides_only_images_no_release_published(tmp_path):
    """As the demo does it: an open release published its test split with labels; the challenge on it takes its
    test images from images collected since, and then no public byte of the store names a hidden label."""
    from challenge.db import make_engine
    from challenge.demo import build_challenge_release

    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=4, per_class=16, seed=5, box_fraction=0.9)
    build_release(store, "open1", val_per_class=2, test_per_class=5, neardup=False)
    # the open parent published the labels of every image a child would keep in test: refused, nothing written
    with pytest.raises(HiddenLabelLeak, match=r"would hide 20 of its 20 test images .*'open1' \(20\)") as exc:
        build_release(store, "c1", parent="open1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    assert len(exc.value.images) == 20 and isinstance(exc.value, UserError)
    with pytest.raises(HiddenLabelLeak, match="would hide"):  # without a parent the salted split picks them too
        build_release(store, "c1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    with pytest.raises(ReleaseInputError, match="no test image"):  # fresh_test, but no image is new
        build_release(store, "c1", parent="open1", val_per_class=2, test_per_class=5, neardup=False,
                      challenge=True, fresh_test=True)
    assert store.list("private") == [] and store.list("releases/c1") == []
    from challenge.truth import ChallengeError

    with pytest.raises(ChallengeError, match="publishes its test labels.*--fresh-test"):  # and says what to do
        load_held_out(store, "open1")

    fresh = _more_images(store, seed=6)
    m = build_challenge_release(store, "open1", fresh, "c1", test_per_class=5, neardup=False)
    held = load_held_out(store, "c1")
    assert held.n == 20 and m["stats"]["challenge"]["fresh_test"]
    open_labels = read_release_table(store, "open1", "labels").to_pandas()
    assert not set(held.image_ids) & set(open_labels.image_id)  # no hidden image was ever published
    assert set(held.image_ids) <= set(fresh["images"].column("image_id").to_pylist())
    child = read_release_table(store, "c1", "labels").to_pandas().set_index("image_id")
    prim = open_labels[open_labels.is_primary]
    assert set(child.loc[prim.image_id[prim.split == "test"]].split) == {"val"}  # published test -> val
    assert set(child.loc[prim.image_id[prim.split == "train"]].split) == {"train"}  # the rest kept its split
    # a board and its snapshot are public too
    svc = ChallengeService(make_engine(f"sqlite:///{tmp_path / 'c.db'}"), store)
    svc.create_challenge("fresh", "c1", "cls", _phase(unlimited=True))
    team, _ = svc.add_team("t")
    svc.submit("fresh", team.id, lines([[t] for t in held.truth]), now=NOW)
    snapshot(svc, "fresh", now=NOW)
    files = every_public_byte(store, tmp_path / "public")
    assert any(k.startswith("open1:") for k in files) and any(k.startswith("challenges/") for k in files)
    assert leaks_in(files, held) == []
    private = next(k for k in store.list("private/releases/c1") if "test_labels-" in k)
    assert len(find_test_labels(store.get(private), held, private)) >= held.n  # the scanner is not blind


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


def test_the_default_limit_is_two_a_week_and_a_phase_limit_spans_the_phase(svc):
    ch = svc.create_challenge("dflt", "c1", "cls", _phase())  # no limit given: ILSVRC's 2 per week
    p = svc.phases(ch)[0]
    assert (p.per_day, p.per_week, p.per_phase) == (None, 2, None)
    held = svc.held_out("c1")
    sub = lines([[t] for t in held.truth])
    team, _ = svc.add_team("weekly")
    svc.submit("dflt", team.id, sub, now=NOW)
    assert svc.submit("dflt", team.id, sub, now=NOW + timedelta(hours=1)).quota[0].left == 0
    with pytest.raises(LimitReached) as exc:
        svc.submit("dflt", team.id, sub, now=NOW + timedelta(days=5))
    assert (exc.value.window, exc.value.limit) == ("week", 2)
    assert exc.value.resets_at == NOW - timedelta(days=1) + timedelta(days=7)  # the phase opened at NOW - 1 day
    svc.submit("dflt", team.id, sub, now=NOW + timedelta(days=6, hours=1))  # the phase's second week
    # a per-phase limit alone: no weekly default, and the count runs over the whole phase
    ch = svc.create_challenge("phase", "c1", "cls", _phase(per_phase=3))
    p = svc.phases(ch)[0]
    assert (p.per_day, p.per_week, p.per_phase) == (None, None, 3)
    other, _ = svc.add_team("phased")
    for day in (0, 7, 14):  # three different weeks
        svc.submit("phase", other.id, sub, now=NOW + timedelta(days=day))
    with pytest.raises(LimitReached, match="the phase's limit") as exc:
        svc.submit("phase", other.id, sub, now=NOW + timedelta(days=15))
    assert (exc.value.window, exc.value.limit, exc.value.resets_at) == ("phase", 3, None)
    assert [(w.kind, w.used, w.left) for w in svc.quota("phase", other.id, now=NOW + timedelta(days=15))] == \
        [("phase", 3, 0)]


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


def test_without_a_choice_the_private_board_takes_the_best_public_submission_and_finals_are_capped(world, tmp_path):
    from challenge.db import make_engine
    from challenge.truth import ChallengeError

    url = f"sqlite:///{tmp_path / 'finals.db'}"
    svc = ChallengeService(make_engine(url), world)
    other_process = ChallengeService(make_engine(url), world)  # a second server worker on the same database
    ch = svc.create_challenge("fin", "c1", "cls", _phase(unlimited=True), final_selections=2)
    held = svc.held_out("c1")
    public = svc.public_mask(ch)

    def mix(public_right, private_right):
        right = np.where(public, public_right, private_right)
        return lines([[t] if r else [t % 4 + 1] for t, r in zip(held.truth, right, strict=True)])

    team, _ = svc.add_team("chooser")
    a = svc.submit("fin", team.id, mix(True, False), now=NOW).submission_id  # best public, all private wrong
    b = svc.submit("fin", team.id, mix(False, True), now=NOW).submission_id  # worst public, all private right
    c = svc.submit("fin", team.id, mix(False, False), now=NOW).submission_id
    rival, _ = svc.add_team("rival")
    svc.submit("fin", rival.id, mix(True, True), now=NOW)
    svc.submit("fin", rival.id, mix(False, False), now=NOW)

    def private_row(service, name):
        board = build_board(service, "fin", "private", now=NOW, preview=True)
        return next((r.submission_id, r.score) for r in board.rows if r.team == name)

    # no choice: the submission behind the public score, not the best private one
    assert private_row(svc, "chooser") == (a, 1.0) and private_row(other_process, "chooser") == (a, 1.0)
    assert private_row(svc, "rival")[1] == 0.0
    with pytest.raises(ChallengeError, match="at most 2 final submissions"):
        svc.select_finals("fin", team.id, [a, b, c], now=NOW)
    assert private_row(other_process, "chooser") == (a, 1.0)  # the refused choice changed nothing
    svc.select_finals("fin", team.id, [c], now=NOW)
    assert private_row(other_process, "chooser") == (c, 1.0)
    svc.select_finals("fin", team.id, [b], now=NOW)  # as many finals as before, another one: not a stale board
    assert private_row(other_process, "chooser") == (b, 0.0)
    svc.select_finals("fin", team.id, [a, b], now=NOW)  # the best private score of the finals counts
    svc.close("fin", now=NOW + timedelta(hours=1))
    board = build_board(other_process, "fin", "private", now=NOW + timedelta(hours=2))
    assert {r.team: (r.submission_id, r.score) for r in board.rows}["chooser"] == (b, 0.0)


def _every_database_value(engine):
    from sqlalchemy import MetaData, select

    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    yield table.name, value


def test_tokens_are_kept_as_their_sha256_only(tmp_path):
    import hashlib

    from sqlalchemy import select

    from challenge.db import Token, make_engine

    svc = ChallengeService(make_engine(f"sqlite:///{tmp_path / 'tokens.db'}"), None)
    team, first = svc.add_team("hashers", [("Ada", "ada@example.org")])
    second = svc.new_team_token("hashers")
    organiser = svc.add_organiser_token()
    cookie, csrf, who = svc.start_session(first)
    assert who.team_id == team.id and svc.authenticate(organiser).role == "organiser"
    secrets_ = [first, second, organiser, cookie]
    values = [(t, v.decode("latin-1") if isinstance(v, bytes) else str(v)) for t, v in _every_database_value(svc.engine)]
    assert len(values) > 20 and any(t == "members" and v == "ada@example.org" for t, v in values)
    for secret in secrets_:
        assert not [t for t, v in values if secret in v or secret[4:24] in v], "a token is stored in plain text"
    with read_session(svc.engine) as s:
        digests = set(s.scalars(select(Token.digest)))
    assert digests == {hashlib.sha256(t.encode()).hexdigest() for t in (first, second, organiser)}
    svc.engine.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("tokens.db*"))  # the file, its WAL and shared memory
    assert raw and not [t for t in secrets_ if t.encode() in raw]


def test_teams_keep_their_members_and_a_revoked_token_signs_nobody_in(tmp_path, capsys, monkeypatch):
    import re

    from sqlalchemy import select

    from challenge.db import Member, Team
    from pipeline.cli import main

    monkeypatch.delenv("SYNSETFORGE_CHALLENGE_DB", raising=False)
    s = str(tmp_path / "data")
    assert main(["--store", s, "challenge", "team", "Team Aurora", "--member", "Ada Lovelace <ada@example.org>",
                 "--member", "Grace Hopper"]) == 0

    def shown_token():
        return re.search(r"token \(shown once[^:]*\): (sfc_\S+)", capsys.readouterr().out).group(1)

    first = shown_token()
    svc = open_service(s)
    with read_session(svc.engine) as db:
        team = db.scalars(select(Team).where(Team.name == "Team Aurora")).one()
        members = sorted((m.name, m.email) for m in db.scalars(select(Member).where(Member.team_id == team.id)))
    assert members == [("Ada Lovelace", "ada@example.org"), ("Grace Hopper", None)] and not team.is_baseline
    assert main(["--store", s, "challenge", "token", "Team Aurora"]) == 0
    second = shown_token()
    assert svc.authenticate(first).team_id == svc.authenticate(second).team_id == team.id  # both work
    cookie, _, _ = svc.start_session(first)
    assert svc.session(cookie) is not None
    assert main(["--store", s, "challenge", "token", "Team Aurora", "--revoke"]) == 0
    third = shown_token()
    assert svc.authenticate(first) is None and svc.authenticate(second) is None
    assert svc.authenticate(third).team_name == "Team Aurora"
    assert svc.session(cookie) is None and svc.start_session(second) is None  # signed out, cannot sign in
    assert main(["--store", s, "challenge", "token", "Team Nobody"]) == 2
    assert "no team 'Team Nobody'" in capsys.readouterr().err


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


def test_the_papers_reference_interval_for_6_66_percent_on_100000_test_images():
    """IJCV 2015 sec. 6.2: the 2014 classification winner, 6.66 % top-5 error on the 100,000 test images, has the
    99.9 % bootstrap interval [6.40, 6.92]."""
    n, wrong = 100_000, 6_660
    loss = np.zeros(n, dtype=np.uint8)
    loss[np.random.default_rng(2014).choice(n, wrong, replace=False)] = 1
    ev = Evaluation("cls", {}, loss=loss, scored=np.ones(n, bool), n=n)
    assert ev.score(np.ones(n, bool)) == pytest.approx(0.0666)
    # the boards' 1,000 rounds: the 0.05 % tails of 1,000 draws move by a few hundredths of a point per seed
    lo, hi = interval(bootstrap([ev], np.ones(n, bool), 1000, seed=7)[:, 0], 0.999)
    assert abs(100 * lo - 6.40) <= 0.08 and abs(100 * hi - 6.92) <= 0.08, (lo, hi)
    # with 50,000 rounds the percentiles settle: within 0.03 points of the paper's figures
    lo, hi = interval(bootstrap([ev], np.ones(n, bool), 50_000, seed=7)[:, 0], 0.999)
    assert abs(100 * lo - 6.40) <= 0.03 and abs(100 * hi - 6.92) <= 0.03, (lo, hi)


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


def test_instances_per_image_count_the_boxes_of_boxed_images_and_correlate_with_accuracy():
    per = 10
    truth = np.repeat(np.arange(1, 5), per)
    # boxes per image: class 1 one (two of its images have none), class 2 two, class 3 two or three, class 4 four
    n_boxes = {1: [1] * 8 + [0, 0], 2: [2] * per, 3: [2, 3] * 5, 4: [4] * per}
    rows, k = [], 0
    for c in range(1, 5):
        for nb in n_boxes[c]:
            for b in range(nb):
                x = 10.0 * b
                rows.append({"image": k, "cls": c, "x_min": x, "y_min": 10.0, "x_max": x + 20.0 + 5 * c, "y_max": 60.0})
            k += 1
    held = held_out_from_arrays(truth, 4, boxes=pd.DataFrame(rows), widths=np.full(k, 100.0),
                                heights=np.full(k, 100.0))
    wrong = {1: 1, 2: 4, 3: 3, 4: 8}  # per-class accuracy 0.9, 0.6, 0.7, 0.2
    loss = np.array([1 if j < wrong[c] else 0 for c in range(1, 5) for j in range(per)], dtype=np.uint8)
    ev = Evaluation("cls", {}, loss=loss, scored=np.ones(k, bool), n=k)
    a = analyse(held, [("team", ev)], plots=False)
    props = a.classes
    assert props.boxes.tolist() == [8, 20, 25, 40] and props.boxed_images.tolist() == [8, 10, 10, 10]
    assert props.instances.tolist() == pytest.approx([1.0, 2.0, 2.5, 4.0])
    assert props.accuracy.tolist() == pytest.approx([0.9, 0.6, 0.7, 0.2])
    # by hand: x = (1, 2, 2.5, 4), mean 2.375; y = (.9, .6, .7, .2), mean .6; sum dx*dy = -1.05,
    # sum dx^2 = 4.6875, sum dy^2 = 0.26: r = -1.05 / sqrt(4.6875 * 0.26) = -0.951112; ranks (1, 2, 3, 4) against
    # (4, 2, 3, 1): d^2 sums to 18, rho = 1 - 6 * 18 / (4 * 15) = -0.8
    corr = a.correlations["instances"]
    assert corr["pearson"] == pytest.approx(-0.951112, abs=1e-6) and corr["spearman"] == pytest.approx(-0.8)
    assert corr["classes"] == 4


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


def _demo_like_store(root):
    """What the demo's pipeline leaves in its store before the challenge step: the demo corpus's distinct photos
    as accepted images with their true classes and boxes, and release 1.0.0 built as the demo builds it (one val
    and one test image per class, every label public)."""
    from pipeline.demo_corpus import DEMO_SYNSETS, build_corpus
    from pipeline.ingest.validate import ValidateConfig, validate_image
    from pipeline.release.synthetic import fill_schema

    store = LocalStore(root)
    corpus = build_corpus(0)
    images, labels, boxes = [], [], []
    for name, t in sorted(corpus.truth.items()):
        if t["kind"] != "distinct":
            continue
        v = validate_image(corpus.files[name].data, ValidateConfig())
        images.append({"image_id": v.image_id, "width": v.width, "height": v.height, "format": v.format,
                       "n_bytes": len(v.stored), "storage_key": store.put_content(v.stored, ".jpg"),
                       "first_url": f"http://corpus.test/images/{name}", "status": "accepted", **v.features})
        labels.append({"image_id": v.image_id, "wnid": t["wnid"], "status": "accepted", "n_votes": 3, "n_yes": 3,
                       "confidence": 0.99, "method": "adaptive-ds"})
        x0, y0, x1, y1 = t["box"]
        boxes.append({"box_id": f"{v.image_id[:16]}-0", "image_id": v.image_id, "wnid": t["wnid"], "x_min": x0,
                      "y_min": y0, "x_max": x1, "y_max": y1, "verified": "accepted", "drawn_by": "w", "seq": 0,
                      "n_drawn": 1, "n_votes": 2, "n_yes": 2, "confidence": 0.99})

    def table(name, rows):
        return fill_schema(name, {c: [r.get(c) for r in rows] for c in rows[0]}, len(rows))

    syn = [{"wnid": d.wnid, "name": d.name, "lemmas": [d.lemma], "gloss": d.lemma, "queries": [d.lemma],
            "is_leaf": True} for d in DEMO_SYNSETS]
    for name, rows in (("synsets", syn), ("images", images), ("labels", labels), ("boxes", boxes)):
        store.write_table(name, table(name, rows))
    build_release(store, "1.0.0", val_per_class=1, test_per_class=1)
    return store


def test_the_demo_challenge_is_the_same_every_run_and_publishes_no_test_label(tmp_path, capsys, monkeypatch):
    from challenge.demo import TEAM, open_demo_challenge

    monkeypatch.delenv("SYNSETFORGE_CHALLENGE_DB", raising=False)
    runs = []
    for run in ("a", "b"):  # two demo stores made alike: the step must print the same
        store = _demo_like_store(tmp_path / run / "store")
        (tmp_path / run / "work").mkdir()
        capsys.readouterr()
        result = open_demo_challenge(store, "1.0.0", tmp_path / run / "work")
        runs.append((capsys.readouterr().out.replace(str(tmp_path / run), "<demo>"), result, store))
    (out, result, store), (out_b, result_b, _) = runs
    assert out == out_b and result["board"].text() == result_b["board"].text()
    assert "sfc_" not in out and "token" in out  # no token shown; how to make one is
    board = result["board"]
    assert [r.team for r in board.rows] == [TEAM, "organisers: class prior"] and board.rows[1].baseline
    assert result["test_images"] == 80 and board.n_images == 40
    assert all(r.high - r.low > 0.05 for r in board.rows)  # intervals of some width, not [0, 0] and [1, 1]
    assert board.rows[0].better_than_next  # and the team is significantly better than the baseline
    held = load_held_out(store, result["release"])
    published = read_release_table(store, "1.0.0", "labels").to_pandas()
    assert not set(held.image_ids) & set(published.image_id)
    assert leaks_in(every_public_byte(store, tmp_path / "public"), held) == []
    # only the hash of the team's token was kept: the page sign-in needs a new one, shown once by the CLI
    from challenge.db import Token

    with read_session(open_service(str(store.root)).engine) as s:
        assert [len(t.digest) for t in s.query(Token)] == [64, 64]


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
