"""A loop that knows its team, on the real Label Studio: a two-person team settles without a duplicate task, and a
third person joining mid-way gets exactly the pairs that still need a new voter.

The two annotators disagree on some pairs (one careful, one who often errs). QC never asks a pair for more votes
than the team can still give, so after both have answered every pair the plan asks nothing more: the pairs both
agree on are decided (at bars two agreeing votes reach), the ones they disagree on say `needs_new_annotator`, and a
push creates no task. When a third annotator joins (added to
`qc.team`), the next round asks those pairs, and only those, for one vote each; push sends them to a project of
overlap 1 (the first project's overlap is never changed); the first two skip them (they have judged them) and the
third answers exactly them.
"""

from __future__ import annotations

import pandas as pd
import pytest
from fixtures_labelstudio import make_images, write_synsets

from crowd.pull import pseudonym, pull
from crowd.push import push
from crowd.simulate import Profile, work
from pipeline.qc.stage import run_qc

pytestmark = pytest.mark.slow
TENCH = "n01440764"
PAIR = ["image_id", "wnid"]


def with_team(settings, team: list[str]):
    # bars two agreeing votes can reach (about 0.9 here), so the pairs the two agree on are decided at the normal
    # bar, and the ones they disagree on (about 0.5) stay pending: no small-team decision in between
    qc = settings.qc.model_copy(update={"team": team, "accept_at": 0.85, "reject_at": 0.15,
                                        "small_team_accept_at": 0.8, "small_team_reject_at": 0.2,
                                        "small_team_decide": False})
    return settings.model_copy(update={"qc": qc})


def live_projects(store) -> pd.DataFrame:
    p = store.read_table("projects").to_pandas()
    return p[(p["kind"] == "verify") & (p["state"] != "archived")]


def work_everywhere(store, people, truth) -> dict[str, int]:
    done = {a.email: 0 for a in people}
    for pid in live_projects(store)["project_id"]:
        for email, n in work(people, int(pid), truth).items():
            done[email] += n
    return done


def test_two_settle_without_duplicates_and_a_third_gets_exactly_the_open_pairs(labelstudio):  # noqa: F811
    ls = labelstudio
    store = ls.new_store()
    images = make_images(store, 16, seed=2323)
    write_synsets(store)
    ids = images["image_id"].tolist()
    store.write_table("image_links", pd.DataFrame({
        "image_id": ids, "wnid": TENCH, "url": [f"file:///p/{i}.jpg" for i in range(len(ids))], "source": "local_dir",
        "rank": 0, "n_urls": 1, "n_synsets": 1, "multi_synset": False, "near_duplicate_of": None}))
    truth = {(i, TENCH): ("yes" if k % 2 else "no") for k, i in enumerate(ids)}
    base = ls.settings(store, gold_rate=0.0)
    key = base.crowd.pseudonym_key.get_secret_value().encode()
    admin = ls.admin()
    careful, careless, newcomer = ls.annotators([Profile(accuracy=1.0), Profile(accuracy=0.55), Profile(accuracy=1.0)])
    team = [pseudonym(careful.email, key), pseudonym(careless.email, key)]

    # ---- a team of two: the plan asks each pair for at most two votes, one task each, and the loop settles
    settings = with_team(base, team)
    run_qc(store, settings)
    plan = store.read_table("push_plan").to_pandas()
    assert len(plan) == len(ids) and plan["n_more"].max() <= 2
    first = push(store, admin, settings)
    assert first["pushed"] == len(ids)
    assert set(live_projects(store)["overlap"]) == {2}
    done = work_everywhere(store, [careful, careless], truth)
    assert done == {careful.email: len(ids), careless.email: len(ids)}
    pull(store, admin, settings)
    summary = run_qc(store, settings)
    plan = store.read_table("push_plan").to_pandas()
    labels = store.read_table("labels").to_pandas()
    need = plan[plan["reason"] == "needs_new_annotator"]
    assert (need["n_more"] == 0).all() and (plan["n_more"] == 0).all()  # nobody left to ask: nothing asked
    assert 0 < len(need) < len(ids), summary  # the careless one disagreed on some pairs, not on all
    assert summary["needs_new_annotator"] == len(need)
    assert set(map(tuple, need[PAIR].values)) == set(map(tuple, labels.loc[labels["status"] == "pending", PAIR].values))
    tasks_before = len(store.read_table("tasks"))
    assert push(store, admin, settings)["pushed"] == 0  # the loop has settled: no task, and no overlap raised
    assert len(store.read_table("tasks")) == tasks_before
    assert set(live_projects(store)["overlap"]) == {2}
    assert work_everywhere(store, [careful, careless], truth) == {careful.email: 0, careless.email: 0}

    # ---- a third person joins: exactly the pairs that need a new voter are asked, one vote each
    settings = with_team(base, [*team, pseudonym(newcomer.email, key)])
    run_qc(store, settings)
    plan = store.read_table("push_plan").to_pandas()
    asked = plan[plan["n_more"] > 0]
    assert set(map(tuple, asked[PAIR].values)) == set(map(tuple, need[PAIR].values))
    assert (asked["n_more"] == 1).all()
    second = push(store, admin, settings)
    assert second["pushed"] == len(need)
    projects = live_projects(store)
    assert sorted(projects["overlap"]) == [1, 2]  # a new project of overlap 1; the first one's overlap unchanged
    first_pid = int(projects.loc[projects["overlap"] == 2, "project_id"].iloc[0])
    assert admin.get_json(f"/api/projects/{first_pid}")["maximum_annotations"] == 2
    done = work_everywhere(store, [careful, careless, newcomer], truth)
    assert done == {careful.email: 0, careless.email: 0, newcomer.email: len(need)}
    pull(store, admin, settings)
    votes = store.read_table("votes").to_pandas()
    by_newcomer = votes[votes["worker"] == pseudonym(newcomer.email, key)]
    assert set(map(tuple, by_newcomer[PAIR].values)) == set(map(tuple, need[PAIR].values))
    tasks = store.read_table("tasks").to_pandas()
    per_pair = tasks.groupby(PAIR).size()
    assert per_pair.max() <= 2 and set(per_pair[per_pair == 2].index) == set(map(tuple, need[PAIR].values))
    run_qc(store, settings)
    labels = store.read_table("labels").to_pandas().set_index(PAIR)
    assert (labels.loc[[tuple(p) for p in need[PAIR].values], "n_votes"] == 3).all()  # the third vote counts
    wrong = [p for p, r in labels.iterrows() if r["status"] in ("accepted", "rejected")
             and (r["status"] == "accepted") != (truth[p] == "yes")]
    assert not wrong
