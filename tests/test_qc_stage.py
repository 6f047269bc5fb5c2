"""QC I/O shell and CLI: tables written, idempotent, bad input refused without writing."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_settings
from pipeline.qc.base import QCInputError
from pipeline.qc.stage import run_qc
from pipeline.store import LocalStore

WNID = "n02084071"


def make_votes(n_images: int = 40, n_workers: int = 6, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, tasks, aid = [], [], 0
    for i in range(n_images):
        image = f"{i:064x}"
        truth = i % 2
        tasks.append({"task_id": i, "project_id": 1, "request_id": f"r{i}", "image_id": image, "wnid": WNID,
                      "kind": "verify", "is_gold": i < 8, "gold_answer": ("yes" if truth else "no") if i < 8 else None,
                      "pushed_at": datetime(2026, 1, 1, tzinfo=UTC)})
        for w in range(n_workers):
            aid += 1
            ans = truth if (w == 5 and False) or rng.random() < 0.9 else 1 - truth
            if w == 5:
                ans = 1 - truth  # an adversary, caught by the gold controls
            rows.append({"annotation_id": aid, "task_id": i, "image_id": image, "wnid": WNID, "worker": f"w{w}",
                         "answer": "yes" if ans else "no", "is_gold": i < 8, "lead_time_s": 2.5,
                         "submitted_at": datetime(2026, 1, 1, 0, 0, aid % 60, tzinfo=UTC)})
    return pd.DataFrame(rows), pd.DataFrame(tasks)


def test_run_qc_writes_tables_and_is_idempotent(tmp_path):
    store = LocalStore(tmp_path / "s")
    votes, tasks = make_votes()
    # a duplicated pull (same annotation id twice) must not count twice
    store.write_table("votes", pd.concat([votes, votes.head(3)], ignore_index=True))
    store.write_table("tasks", tasks)
    settings = load_settings(env={})
    pairs = pd.DataFrame({"image_id": ["f" * 64], "wnid": [WNID]})
    s1 = run_qc(store, settings, pairs=pairs)
    t1 = {n: store.read_table(n).to_pandas() for n in ("labels", "workers", "push_plan")}
    s2 = run_qc(store, settings, pairs=pairs)
    t2 = {n: store.read_table(n).to_pandas() for n in ("labels", "workers", "push_plan")}
    r1, r2 = s1.pop("qc_round"), s2.pop("qc_round")
    assert (r1["mode"], r2["mode"]) == ("full", "unchanged")  # the second round has nothing new to decide
    assert s1 == s2
    for name in t1:
        pd.testing.assert_frame_equal(t1[name], t2[name])
    labels = t1["labels"]
    assert len(labels) == 40 - 8 + 1  # gold controls excluded, the extra pair included
    assert labels.set_index("image_id").loc["f" * 64, "status"] == "pending"
    assert labels["n_votes"].max() == 6
    w = t1["workers"].set_index("worker")
    assert w.loc["w5", "flagged"] and not w.loc["w5", "votes_used"]
    plan = t1["push_plan"].set_index("image_id")
    assert plan.loc["f" * 64, "n_more"] == settings.qc.initial_votes and plan.loc["f" * 64, "reason"] == "new"
    accepted = labels[labels["status"] == "accepted"]
    assert (accepted["image_id"].map(lambda h: int(h, 16) % 2) == 1).all()  # accepted images are the true ones
    assert s1["per_synset"][0]["wnid"] == WNID


def test_empty_store_gives_empty_tables(tmp_path):
    store = LocalStore(tmp_path / "s")
    summary = run_qc(store, load_settings(env={}))
    assert summary["pairs"] == 0 and summary["push_pairs"] == 0
    assert store.read_table("labels").num_rows == 0


def test_bad_answer_is_refused_and_nothing_is_written(tmp_path):
    store = LocalStore(tmp_path / "s")
    votes, tasks = make_votes(4)
    votes.loc[2, "answer"] = "maybe"
    store.write_table("votes", votes)
    with pytest.raises(QCInputError, match="other than 'yes'/'no'.*nothing was written"):
        run_qc(store, load_settings(env={}))
    assert not store.has_table("labels") and not store.has_table("push_plan")


def test_cli_prints_precision_and_push_list(tmp_path, capsys):
    from pipeline.cli import main

    store = LocalStore(tmp_path / "s")
    votes, tasks = make_votes()
    store.write_table("votes", votes)
    store.write_table("tasks", tasks)
    assert main(["--store", str(tmp_path / "s"), "qc", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "per synset" in out and WNID in out and "next push" in out
    assert main(["--store", str(tmp_path / "s"), "qc", "--pairs", str(tmp_path / "nope.csv")]) == 2


@pytest.mark.slow
def test_run_qc_on_s3(store):
    votes, tasks = make_votes(12)
    store.write_table("votes", votes)
    store.write_table("tasks", tasks)
    summary = run_qc(store, load_settings(env={}))
    assert summary["pairs"] == 4 and store.has_table("push_plan") and store.has_table("workers")


def test_run_qc_plans_first_votes_for_ingested_links_but_not_near_copies(tmp_path):
    store = LocalStore(tmp_path / "s")
    links = pd.DataFrame({
        "image_id": ["a" * 64, "b" * 64, "c" * 64], "wnid": [WNID] * 3, "url": ["u1", "u2", "u3"],
        "source": ["local_dir"] * 3, "rank": [0, 1, 2], "n_urls": [1, 1, 1], "n_synsets": [1, 1, 1],
        "multi_synset": [False] * 3, "near_duplicate_of": [None, None, "a" * 64],
    })
    store.write_table("image_links", links)
    summary = run_qc(store, load_settings(env={}))
    plan = store.read_table("push_plan").to_pandas()
    assert sorted(plan["image_id"]) == ["a" * 64, "b" * 64]  # the near copy of a is not paid for twice
    assert (plan["n_more"] > 0).all() and summary["pending"] == 2


def test_one_grid_annotation_gives_one_vote_per_image():
    """A grid task yields several votes under one annotation id (one per image); all of them count, while an
    exact repeat of a (annotation, image) row is still dropped."""
    from pipeline.qc.stage import clean_votes

    votes, _ = make_votes(n_images=3, n_workers=1)
    votes["annotation_id"] = 7  # one grid annotation covering the three images
    cleaned = clean_votes(pd.concat([votes, votes.head(1)], ignore_index=True))
    assert sorted(cleaned["image_id"]) == sorted(votes["image_id"])


def test_push_plan_asks_about_the_undecided_pairs_across_several_synsets():
    """Labels are sorted by (wnid, image_id), the model's decisions by task key: each pair's n_more must stay
    with that pair. Images whose id order is the reverse of their synset order make a mix-up visible."""
    from pipeline.qc.stage import aggregate

    settings = load_settings(env={})
    wnids = ["n00000003", "n00000002", "n00000001"]
    images = [f"{i:064x}" for i in range(3)]  # image 0 -> the largest wnid, and so on
    rows, aid = [], 0
    for img, wnid, answers in zip(images, wnids, (["yes", "no"], ["yes"] * 8, ["no"] * 8), strict=True):
        for w, ans in enumerate(answers):
            aid += 1
            rows.append({"annotation_id": aid, "task_id": aid, "image_id": img, "wnid": wnid, "worker": f"w{w}",
                         "answer": ans, "is_gold": False, "lead_time_s": 1.0,
                         "submitted_at": datetime(2026, 1, 1, tzinfo=UTC)})
    labels, _, plan, _ = aggregate(pd.DataFrame(rows), pd.DataFrame(), None, settings.qc)
    status = dict(zip(labels["image_id"], labels["status"], strict=True))
    assert status == {images[0]: "pending", images[1]: "accepted", images[2]: "rejected"}
    assert plan[["image_id", "wnid"]].values.tolist() == [[images[0], wnids[0]]]
    assert plan["n_votes"].tolist() == [2] and "n_more" not in labels.columns


# ----- the QC method is a setting -----

def store_votes(long: pd.DataFrame, wnid: str = WNID) -> pd.DataFrame:
    """A votes table from a long (task, worker, label) frame; the task becomes the image id."""
    return pd.DataFrame({
        "annotation_id": np.arange(1, len(long) + 1), "task_id": np.arange(1, len(long) + 1),
        "image_id": [f"{int(t):064x}" for t in long["task"]], "wnid": wnid, "worker": long["worker"].astype(str),
        "answer": long["label"], "is_gold": False, "lead_time_s": 1.0,
        "submitted_at": datetime(2026, 1, 1, tzinfo=UTC)})


def spammer_crowd(n_tasks: int = 200, seed: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """Every image: three careful workers (90 %) and two who always answer wrong."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n_tasks)
    rows = []
    for t in range(n_tasks):
        rows += [(t, f"h{w}", truth[t] if rng.random() < 0.9 else 1 - truth[t]) for w in range(3)]
        rows += [(t, f"a{w}", 1 - truth[t]) for w in range(2)]
    long = pd.DataFrame(rows, columns=["task", "worker", "label"])
    long["label"] = np.where(long["label"] == 1, "yes", "no")
    return long, truth


@pytest.mark.parametrize("method", ["adaptive-ds", "ds", "mv", "confidence-table"])
def test_each_method_labels_with_its_name(tmp_path, method):
    from pipeline.qc.stage import METHODS

    assert method in METHODS
    store = LocalStore(tmp_path / "s")
    long, _ = spammer_crowd(80)
    store.write_table("votes", store_votes(long))
    settings = load_settings(env={"SYNSETFORGE__QC__METHOD": method}, overrides={"qc": {"max_votes_per_image": 5}})
    summary = run_qc(store, settings)
    labels = store.read_table("labels").to_pandas()
    assert summary["method"] == method and len(labels) == 80
    assert set(labels["method"]) == {method}
    assert store.read_table("workers").num_rows == 5  # every method writes the same worker table


def test_methods_differ_where_workers_differ():
    """Five votes per image, two of them always wrong: majority vote is wrong whenever one careful worker slips;
    Dawid-Skene reads the wrong answers as the evidence they are, the adaptive rule drops them."""
    from pipeline.qc.stage import aggregate

    long, truth = spammer_crowd()
    votes = store_votes(long)
    qc = load_settings(env={}, overrides={"qc": {"max_votes_per_image": 5}}).qc
    right = {}
    for method in ("mv", "ds", "adaptive-ds"):
        labels, _, _, _ = aggregate(votes, pd.DataFrame(), None, qc, method=method)
        labels = labels.assign(t=labels["image_id"].map(lambda h: int(h, 16))).set_index("t").sort_index()
        pred = labels["confidence"].to_numpy() > 0.5
        right[method] = (pred == truth.astype(bool)).mean()
        assert (labels["method"] == method).all()
    assert right["mv"] < 0.8 and right["ds"] > 0.95 and right["adaptive-ds"] > 0.95


def test_fixed_methods_plan_a_fixed_overlap_and_decide_at_it():
    """ds / mv: every image is asked for max_votes_per_image votes (max_batch at a time), decided at that
    overlap by the method's answer, an exact tie pending at the cap."""
    from pipeline.qc.stage import aggregate

    answers = {0: [], 1: ["yes", "yes"], 2: ["yes"] * 4 + ["no"], 3: ["yes", "no", "yes", "no"] + ["no"],
               4: ["no"] * 5}
    long = pd.DataFrame([(t, f"w{i}", a) for t, ans in answers.items() for i, a in enumerate(ans)],
                        columns=["task", "worker", "label"])
    pairs = pd.DataFrame({"image_id": [f"{0:064x}"], "wnid": [WNID]})
    qc = load_settings(env={}, overrides={"qc": {"max_votes_per_image": 5}}).qc
    labels, _, plan, _ = aggregate(store_votes(long), pd.DataFrame(), pairs, qc, method="mv")
    st = dict(zip(labels["image_id"].map(lambda h: int(h, 16)), labels["status"], strict=True))
    assert st == {0: "pending", 1: "pending", 2: "accepted", 3: "rejected", 4: "rejected"}
    p = plan.assign(t=plan["image_id"].map(lambda h: int(h, 16))).set_index("t")
    assert p["n_more"].to_dict() == {0: 5, 1: 3} and p["reason"].to_dict() == {0: "new", 1: "fixed"}
    tie = pd.DataFrame([(9, f"w{i}", a) for i, a in enumerate(["yes", "no"] * 2)], columns=["task", "worker", "label"])
    qc4 = load_settings(env={}, overrides={"qc": {"max_votes_per_image": 4, "max_batch": 2}}).qc
    labels, _, plan, _ = aggregate(store_votes(pd.concat([tie, long[long["task"] == 1]])), pd.DataFrame(), None,
                                   qc4, method="mv")
    assert labels.set_index("image_id").loc[f"{9:064x}", "status"] == "pending"  # 2 - 2 at the cap
    assert plan[["image_id", "n_more"]].values.tolist() == [[f"{1:064x}", 2]]  # max_batch at a time


def test_confidence_table_calibrates_a_share_then_decides_the_rest_from_it():
    from pipeline.qc.stage import aggregate, calibration_subset

    qc = load_settings(env={}, overrides={"qc": {"max_votes_per_image": 5, "calibration_share": 0.2}}).qc
    pairs = pd.DataFrame({"image_id": [f"{i:064x}" for i in range(40)], "wnid": WNID})
    labels, _, plan, _ = aggregate(pd.DataFrame(), pd.DataFrame(), pairs, qc, method="confidence-table")
    keys = pd.Index(pairs["image_id"] + "|" + WNID)
    calib = calibration_subset(keys, pd.Series(WNID, index=keys), 0.2)
    assert 2 <= calib.sum() <= 20
    by = plan.set_index("image_id")
    cal_ids = pairs["image_id"][calib]
    assert (by.loc[cal_ids, "n_more"] == 5).all() and (by.loc[cal_ids, "reason"] == "calibration").all()
    rest = pairs["image_id"][~calib]
    assert (by.loc[rest, "n_more"] == qc.initial_votes).all() and (by.loc[rest, "reason"] == "new").all()

    # first votes in, no calibration image complete: the rest wait for the table
    truth = {i: i % 2 for i in range(40)}
    def votes_for(n_of):
        rows = [(i, f"w{k}", "yes" if truth[i] else "no") for i in range(40) for k in range(n_of(i))]
        return store_votes(pd.DataFrame(rows, columns=["task", "worker", "label"]))
    idx = {int(h, 16) for h in cal_ids}
    _, _, plan, _ = aggregate(votes_for(lambda i: 2), pd.DataFrame(), pairs, qc, method="confidence-table")
    assert set(plan["image_id"].map(lambda h: int(h, 16))) == idx  # only the calibration images are asked
    labels, _, plan, _ = aggregate(votes_for(lambda i: 5 if i in idx else 2), pd.DataFrame(), pairs, qc,
                                   method="confidence-table")
    st = labels.set_index(labels["image_id"].map(lambda h: int(h, 16)))["status"]
    assert all(st[i] == ("accepted" if truth[i] else "rejected") for i in range(40))  # two agreeing votes suffice here
    assert plan.empty and (labels["method"] == "confidence-table").all()


def test_unknown_method_is_refused(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.config import ConfigError
    from pipeline.qc.stage import aggregate

    with pytest.raises(QCInputError, match="not one of adaptive-ds, ds, mv, confidence-table"):
        aggregate(pd.DataFrame(), pd.DataFrame(), None, load_settings(env={}).qc, method="median")
    with pytest.raises(ConfigError, match="qc.method"):
        load_settings(env={"SYNSETFORGE__QC__METHOD": "median"})
    with pytest.raises(SystemExit):
        main(["--store", str(tmp_path / "s"), "qc", "--method", "median"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_method_flag_and_summary_say_which_method_and_gold(tmp_path, capsys):
    from pipeline.cli import main

    store = LocalStore(tmp_path / "s")
    long, _ = spammer_crowd(40)
    store.write_table("votes", store_votes(long))
    assert main(["--store", str(tmp_path / "s"), "qc", "--method", "mv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mv: ") and "no gold controls yet: workers are judged by agreement only" in out
    # five workers can never give mv its ten votes: pairs all five voted on are decided at the small-team bar
    assert {m.removesuffix("/small-team") for m in store.read_table("labels").to_pandas()["method"]} == {"mv"}


def test_crowd_dag_offers_every_method():
    """The DAG file holds its Param's choices literally (DAG files import no stage code): they must be the stage's."""
    import ast
    from pathlib import Path

    from pipeline.qc.stage import METHODS

    src = (Path(__file__).resolve().parent.parent / "dags" / "crowd.py").read_text()
    params = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Dict)
                  and any(isinstance(k, ast.Constant) and k.value == "qc_method" for k in n.keys))
    param = next(v for k, v in zip(params.keys, params.values, strict=True)
                 if isinstance(k, ast.Constant) and k.value == "qc_method")
    enum = next(kw.value for kw in param.keywords if kw.arg == "enum")
    assert [e.value for e in enum.elts] == [None, *METHODS]
    assert 'method=params.get("qc_method")' in src


# ----- QC without gold says so -----

def test_summary_says_when_there_is_no_gold(tmp_path):
    from pipeline.qc.stage import NO_GOLD_NOTE

    store = LocalStore(tmp_path / "s")
    long, _ = spammer_crowd(30)
    store.write_table("votes", store_votes(long))
    s = run_qc(store, load_settings(env={}))
    assert s["gold"] == 0 and s["gold_votes"] == 0 and s["gold_table"] == 0
    assert s["gold_note"].startswith(NO_GOLD_NOTE) and "no gold table" in s["gold_note"]

    store.write_table("gold", pd.DataFrame({"image_id": ["e" * 64], "wnid": [WNID], "answer": ["yes"],
                                            "source": ["expert"]}))
    s = run_qc(store, load_settings(env={}))
    assert s["gold"] == 0 and s["gold_table"] == 1 and "none answered yet" in s["gold_note"]

    votes, tasks = make_votes()  # eight answered controls, six workers each
    store.write_table("votes", votes)
    store.write_table("tasks", tasks)
    s = run_qc(store, load_settings(env={}))
    assert s["gold"] == 8 and s["gold_votes"] == 48 and NO_GOLD_NOTE not in s["gold_note"]
