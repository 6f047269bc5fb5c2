"""The crowd loop's Label Studio side at scale, against the real server: sharded projects (crowd.project_size tasks
each, one overlap each, archived when finished), pull by watermark (only what changed; edits; a crash between the
votes and the watermark), push that reconciles only the batch in doubt, never opens a second task for an open pair
and never changes the overlap of a task it pushed."""

from __future__ import annotations

import pandas as pd
import pytest
from fixtures_labelstudio import crash_before_tasks_write, make_images, write_synsets

from crowd.kinds import choices_result
from crowd.provision import kind_project_ids, provision, read_projects
from crowd.pull import pull
from crowd.push import push, server_tasks
from crowd.simulate import Profile, submit
from pipeline.qc.stage import clean_votes

pytestmark = pytest.mark.slow
TENCH = "n01440764"


def _world(ls, n: int, seed: int, **crowd):
    store = ls.new_store()
    images = make_images(store, n, seed=seed, size=(32, 24))
    write_synsets(store)
    settings = ls.settings(store, gold_rate=0.0, **crowd)
    return store, settings, ls.admin(), images["image_id"].tolist()


def _plan(ids, n_more):
    return pd.DataFrame({"image_id": ids, "wnid": TENCH, "n_more": n_more})


def _answer(worker, tasks: pd.DataFrame, answer: str = "yes") -> list[int]:
    """The worker submits one annotation per task row (as a person clicking would); returns annotation ids."""
    return [submit(worker.client, int(t.task_id), int(t.project_id), choices_result(answer), 1.5)
            for t in tasks.itertuples(index=False)]


def test_projects_roll_over_at_the_size_and_finished_ones_are_archived_and_no_longer_pulled(labelstudio):
    store, settings, client, ids = _world(labelstudio, 13, seed=701, project_size=4)
    prefix = settings.crowd.project_prefix
    out = push(store, client, settings, plan=_plan(ids[:10], 1))
    assert out["pushed"] == 10 and sorted(out["projects"].values()) == [2, 4, 4]
    projects = read_projects(store).sort_values("shard")
    assert projects["title"].tolist() == [f"{prefix} verify", f"{prefix} verify 2", f"{prefix} verify 3"]
    assert projects["n_tasks"].tolist() == [4, 4, 2] and projects["state"].tolist() == ["full", "full", "open"]
    assert (projects["overlap"] == 1).all()
    for pid, n in zip(projects["project_id"], projects["n_tasks"], strict=True):
        remote = server_tasks(client, int(pid))
        assert len(remote) == n and client.get_json(f"/api/projects/{int(pid)}/")["maximum_annotations"] == 1

    # the next push fills the open project first, then opens a fourth
    out = push(store, client, settings, plan=_plan(ids[10:13], 1))
    projects = read_projects(store).sort_values("shard")
    assert out["pushed"] == 3 and projects["n_tasks"].tolist() == [4, 4, 4, 1]
    assert projects["title"].iloc[-1] == f"{prefix} verify 4"

    # every task of the first two projects answered: the pull after that archives them
    [worker] = labelstudio.annotators([Profile(accuracy=1.0)])
    tasks = store.read_table("tasks").to_pandas()
    first_two = projects["project_id"].iloc[:2].tolist()
    ann = _answer(worker, tasks[tasks["project_id"].isin(first_two)])
    got = pull(store, client, settings, kinds=["verify"])
    assert got["new_votes"] == 8 and sorted(got["archived"]) == sorted(first_two)
    projects = read_projects(store).set_index("project_id")
    assert projects.loc[first_two, "state"].tolist() == ["archived", "archived"]
    pulled_at = projects.loc[first_two, "pulled_at"].tolist()

    # an archived project is not asked again: a late edit there never reaches the votes
    worker.client.request_json("PATCH", f"/api/annotations/{ann[0]}/", json={"result": choices_result("no")})
    _answer(worker, tasks[tasks["project_id"] == projects.index[2]].head(1))
    again = pull(store, client, settings, kinds=["verify"])
    assert again["new_votes"] == 1 and again["projects"] == 2 and not again["archived"]
    assert read_projects(store).set_index("project_id").loc[first_two, "pulled_at"].tolist() == pulled_at
    votes = store.read_table("votes").to_pandas()
    assert (votes.loc[votes["annotation_id"] == ann[0], "answer"] == "yes").all() and len(votes) == 9


def test_watermark_pull_reads_only_what_changed_edits_follow_the_latest_answer_and_a_crash_loses_nothing(
        labelstudio, monkeypatch):
    store, settings, client, ids = _world(labelstudio, 9, seed=702, pull_lag_s=0.0)
    push(store, client, settings, plan=_plan(ids, 2))
    tasks = store.read_table("tasks").to_pandas().sort_values("task_id")
    a, b = labelstudio.annotators([Profile(accuracy=1.0)] * 2)

    first = _answer(a, tasks.iloc[:3])
    out = pull(store, client, settings, kinds=["verify"])
    assert (out["new_votes"], out["annotations_seen"]) == (3, 3)
    assert pull(store, client, settings, kinds=["verify"])["annotations_seen"] == 0  # nothing changed: nothing read

    # round 2: only the tasks touched since are read (a on three new tasks, b on two of them)
    _answer(a, tasks.iloc[3:6], "no")
    _answer(b, tasks.iloc[3:5])
    out = pull(store, client, settings, kinds=["verify"])
    assert (out["new_votes"], out["annotations_seen"]) == (5, 5)

    # an edit after the pull: a new row for the same annotation with the edit time; QC keeps the latest answer
    a.client.request_json("PATCH", f"/api/annotations/{first[0]}/", json={"result": choices_result("no")})
    out = pull(store, client, settings, kinds=["verify"])
    assert (out["new_votes"], out["edited"]) == (1, 1)
    votes = store.read_table("votes").to_pandas()
    rows = votes[votes["annotation_id"] == first[0]].sort_values("submitted_at")
    assert rows["answer"].tolist() == ["yes", "no"] and rows["submitted_at"].is_monotonic_increasing
    clean = clean_votes(votes)
    assert clean.loc[clean["annotation_id"] == first[0], "answer"].tolist() == ["no"] and len(clean) == 8

    # a crash after the votes were appended and before the watermark was written
    from crowd import provision as provision_mod

    _answer(b, tasks.iloc[6:9], "no")
    real = provision_mod.write_projects
    watermark = read_projects(store)["watermark"].max()

    def crash(store_, table):
        raise KeyboardInterrupt("simulated crash between the votes append and the watermark write")

    monkeypatch.setattr(provision_mod, "write_projects", crash)
    with pytest.raises(KeyboardInterrupt):
        pull(store, client, settings, kinds=["verify"])
    monkeypatch.setattr(provision_mod, "write_projects", real)
    assert len(store.read_table("votes")) == 12 and read_projects(store)["watermark"].max() == watermark
    out = pull(store, client, settings, kinds=["verify"])  # reads the three again, adds nothing
    assert (out["new_votes"], out["annotations_seen"]) == (0, 3)
    votes = store.read_table("votes").to_pandas()
    assert len(votes) == 12 and not votes.duplicated(["annotation_id", "image_id", "submitted_at"]).any()
    assert read_projects(store)["watermark"].max() > watermark

    # with a long lag every pull reads the same annotations again: still no duplicate, edits stay single
    lagging = labelstudio.settings(store, pull_lag_s=3600.0, project_prefix=settings.crowd.project_prefix)
    for _ in range(2):
        assert pull(store, client, lagging, kinds=["verify"])["new_votes"] == 0
    assert len(store.read_table("votes")) == 12


def test_push_after_a_crash_adopts_only_the_batch_in_doubt_without_listing_the_project(labelstudio, monkeypatch):
    from crowd.client import CrowdClient

    store, settings, client, ids = _world(labelstudio, 10, seed=703)
    assert push(store, client, settings, plan=_plan(ids[:5], 3))["pushed"] == 5
    known = store.read_table("tasks").to_pandas()
    pid = int(known["project_id"].iloc[0])
    crash_before_tasks_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        push(store, client, settings, plan=_plan(ids[5:], 3))
    monkeypatch.undo()
    assert len(store.read_table("tasks")) == 5 and len(server_tasks(client, pid)) == 10

    listings = []
    real = CrowdClient.iter_filtered_tasks

    def record(self, project_id, filters, **kw):
        listings.append((project_id, filters))
        return real(self, project_id, filters, **kw)

    def never(*a, **k):
        raise AssertionError("push listed every task of a project")

    monkeypatch.setattr(CrowdClient, "iter_filtered_tasks", record)
    monkeypatch.setattr(CrowdClient, "iter_tasks", never)
    out = push(store, client, settings, plan=_plan(ids, 3))
    assert (out["adopted"], out["pushed"], out["resumed"]) == (5, 0, 0)
    assert listings == [(pid, [{"filter": "filter:tasks:id", "operator": "greater", "type": "Number",
                                "value": int(known["task_id"].max())}])]
    monkeypatch.undo()
    tasks = store.read_table("tasks").to_pandas()
    remote = server_tasks(client, pid)
    assert len(tasks) == 10 and sorted(tasks["task_id"]) == sorted(remote["task_id"])
    assert set(tasks["image_id"]) == set(ids) and remote["request_id"].is_unique


def test_no_second_task_for_an_open_pair_and_the_overlap_of_pushed_tasks_never_changes(labelstudio):
    store, settings, client, ids = _world(labelstudio, 6, seed=704)
    out = push(store, client, settings, plan=_plan(ids[:4], 2))
    (pid,) = out["projects"]
    assert out["pushed"] == 4 and client.get_json(f"/api/projects/{pid}/")["maximum_annotations"] == 2

    # issue 23: the same pairs again with three annotations each: they are open, nothing is pushed, and it says so
    again = push(store, client, settings, plan=_plan(ids[:4], 3), overlap=3)
    assert (again["pushed"], again["open_pairs"]) == (0, 4) and "4 pair(s) of the plan already have an open task" \
        in again["message"]
    assert len(server_tasks(client, pid)) == 4
    # provisioning with another overlap opens another project: this one and its tasks keep theirs
    other = provision(client, settings, kinds=["verify"], overlap=3, store=store)["verify"]
    assert other != pid
    mixed = push(store, client, settings, plan=_plan(ids, 3), project_id=other)
    assert (mixed["pushed"], mixed["open_pairs"], mixed["projects"]) == (2, 4, {other: 2})
    assert client.get_json(f"/api/projects/{pid}/")["maximum_annotations"] == 2
    assert set(server_tasks(client, pid)["task_id"]) == set(store.read_table("tasks").to_pandas().query(
        "project_id == @pid")["task_id"])
    listed = client.get_json("/api/tasks", project=pid, page_size=100)["tasks"]
    assert [t["overlap"] for t in listed] == [2, 2, 2, 2]
    assert {t["overlap"] for t in client.get_json("/api/tasks", project=other, page_size=100)["tasks"]} == {3}

    # half the overlap answered: still open; all of it answered and pulled: the pair may be asked again
    a, b = labelstudio.annotators([Profile(accuracy=1.0)] * 2)
    tasks = store.read_table("tasks").to_pandas()
    first = tasks[tasks["project_id"] == pid]
    _answer(a, first)
    pull(store, client, settings, kinds=["verify"])
    assert push(store, client, settings, plan=_plan(ids[:4], 1))["pushed"] == 0
    _answer(b, first)
    pull(store, client, settings, kinds=["verify"])
    later = push(store, client, settings, plan=_plan(ids[:4], 1))
    assert later["pushed"] == 4 and later["open_pairs"] == 0
    (one,) = later["projects"]
    assert one not in (pid, other) and client.get_json(f"/api/projects/{one}/")["maximum_annotations"] == 1
    assert kind_project_ids(client, settings, "verify", store) == [pid, other, one]
