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
