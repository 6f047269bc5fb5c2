"""The grid task kind (issue 11): many candidate images of one synset per task, ticked by the worker.

Fast tests cover grouping into grids (with gold controls), task data, answer mapping and pull's per-image
votes; the slow ones push grids to a real Label Studio, let a simulated worker answer, and pull."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from fixtures_labelstudio import crash_before_tasks_write, make_images, write_synsets

from crowd import push as push_mod
from crowd.gold import worker_gold
from crowd.kinds import GRID, GRID_MARK, KINDS, BadAnnotation, group_grid
from crowd.pull import annotations_to_votes
from crowd.push import REQUEST_COLUMNS, _task_requests, plan_requests

W1, W2 = "n00000001", "n00000002"
EMPTY = pd.DataFrame(columns=REQUEST_COLUMNS)


def _requests(n1: int, n2: int, n_more: int = 3) -> pd.DataFrame:
    plan = pd.DataFrame({"image_id": [f"a{i}" for i in range(n1)] + [f"b{i}" for i in range(n2)],
                         "wnid": [W1] * n1 + [W2] * n2, "n_more": n_more})
    return plan_requests(plan, kind="grid", project_id=5, history=EMPTY, open_request_ids=set(), gold=None,
                         gold_rate=0.0)


def _gold(n_yes: int = 5, n_no: int = 4) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"gy{i}" for i in range(n_yes)] + [f"gn{i}" for i in range(n_no)],
                         "wnid": W1, "answer": ["yes"] * n_yes + ["no"] * n_no, "source": "test"})


def test_grid_kind_is_registered_and_its_config_repeats_one_tick_per_image():
    assert KINDS["grid"] is GRID and GRID.extra["project"]["enable_empty_annotation"] is True
    root = ET.fromstring(GRID.label_config)
    rep = root.find(".//Repeater")
    assert rep is not None and rep.get("on") == "$images" and rep.get("indexFlag") == "{{idx}}"
    image, choices = rep.find(".//Image"), rep.find(".//Choices")
    assert image.get("value") == "$images[{{idx}}].image"
    # The names the front end produces after replacing {{idx}} are the ones parse accepts.
    assert GRID_MARK.fullmatch(choices.get("name").replace("{{idx}}", "7"))
    assert choices.get("toName") == image.get("name") == "img_{{idx}}"
    assert [c.get("value") for c in choices.findall("Choice")] == ["yes"]
    assert "$lemmas" in GRID.label_config and "$gloss" in GRID.label_config


def test_group_grid_makes_one_synset_grids_of_48_with_3_positive_and_3_negative_controls():
    new = _requests(100, 20)
    out = group_grid(new, gold=_gold(), history=EMPTY, project_id=5)
    grids = out.groupby("task_key")
    assert grids["wnid"].nunique().eq(1).all()
    w1 = out[out["wnid"] == W1].groupby("task_key")
    # 100 candidates, 42 per grid (48 - 6 controls): three even grids of 33/34/33 + 6 controls.
    assert sorted(w1.size().tolist()) == [39, 39, 40] and max(grids.size()) <= 48
    assert w1.apply(lambda g: (g["is_gold"] & (g["gold_answer"] == "yes")).sum()).eq(3).all()
    assert w1.apply(lambda g: (g["is_gold"] & (g["gold_answer"] == "no")).sum()).eq(3).all()
    # Every candidate in exactly one grid; no image twice in a grid; every request id unique.
    cand = out[~out["is_gold"]]
    assert sorted(cand["image_id"]) == sorted(new["image_id"]) and out["request_id"].is_unique
    assert not out.duplicated(["task_key", "image_id"]).any()
    # Controls are spread: with 5 positives over 3 grids each is used once or twice (least used first).
    assert out[out["is_gold"] & (out["gold_answer"] == "yes")]["image_id"].value_counts().max() == 2
    # No gold for W2: one grid of its 20 candidates.
    assert out[out["wnid"] == W2]["task_key"].nunique() == 1 and out[out["wnid"] == W2]["is_gold"].sum() == 0
    # The same input gives the same grids (keys are hashes of the member requests).
    again = group_grid(_requests(100, 20), gold=_gold(), history=EMPTY, project_id=5)
    assert sorted(again["task_key"].unique()) == sorted(out["task_key"].unique())
    # Grid size is configurable.
    small = group_grid(new, gold=_gold(), history=EMPTY, project_id=5, size=12)
    assert small.groupby("task_key").size().max() <= 12


def test_group_grid_gives_reused_controls_new_request_ids_and_one_overlap_per_grid():
    new = _requests(10, 0)
    new.loc[0, "overlap"] = 5
    first = group_grid(new, gold=_gold(1, 1), history=EMPTY, project_id=5, size=8)
    assert first.groupby("task_key")["overlap"].nunique().eq(1).all()
    assert set(first.loc[first["task_key"] == first.loc[first["image_id"] == "a0", "task_key"].iloc[0], "overlap"]) == {5}
    # Next push: the controls are asked again under new ids (k counts the pair's earlier requests).
    second = group_grid(_requests(10, 0).assign(image_id=lambda d: d["image_id"] + "x",
                                                request_id=lambda d: d["request_id"] + "x"),
                        gold=_gold(1, 1), history=first, project_id=5, size=8)
    g1 = set(first.loc[first["is_gold"], "request_id"])
    g2 = set(second.loc[second["is_gold"], "request_id"])
    assert g1 and g2 and not g1 & g2


def test_task_requests_regroups_logged_grids_exactly():
    out = group_grid(_requests(30, 0), gold=_gold(), history=EMPTY, project_id=5, size=12)
    tasks = _task_requests(out.sample(frac=1.0, random_state=1), GRID)
    assert sorted(t["request_id"] for t, _ in tasks) == sorted(out["task_key"].unique())
    for task, items in tasks:
        assert {i["request_id"] for i in items} == set(out.loc[out["task_key"] == task["request_id"], "request_id"])
    with pytest.raises(push_mod.PlanError, match="no task_key"):
        _task_requests(out.assign(task_key=None), GRID)


def _data(n: int = 4) -> dict:
    ctx = {"synsets": {W1: {"lemmas": ["tench", "Tinca tinca"], "gloss": "a fish"}},
           "image_url": lambda i: f"/data/local-files/?d={i}.jpg"}
    req = {"request_id": "g", "wnid": W1, "items": [{"request_id": f"r{i}", "image_id": f"i{i}"} for i in range(n)]}
    return GRID.build(req, ctx) | {"request_id": "g", "wnid": W1, "kind": "grid"}


def test_build_parse_and_render_round_trip():
    data = _data(5)
    assert data["lemmas"] == "tench, Tinca tinca" and data["gloss"] == "a fish" and data["n_images"] == 5
    assert data["images"][2] == {"image": "/data/local-files/?d=i2.jpg", "image_id": "i2", "request_id": "r2"}
    answers = {"i0": "yes", "i1": "no", "i2": "yes", "i3": "no", "i4": "no"}
    result = GRID.render(answers, data)
    assert [r["from_name"] for r in result] == ["mark_0", "mark_2"]
    assert dict(GRID.parse(result, data)) == answers
    assert dict(GRID.parse([], data)) == dict.fromkeys(answers, "no")  # nothing ticked: all no
    with pytest.raises(KeyError):
        GRID.build({"request_id": "g", "wnid": "n99999999", "items": []}, {"synsets": {}, "image_url": str})


@pytest.mark.parametrize("result, why", [
    ([{"from_name": "mark_9", "to_name": "img_9", "type": "choices", "value": {"choices": ["yes"]}}], "past"),
    ([{"from_name": "answer", "to_name": "image", "type": "choices", "value": {"choices": ["yes"]}}], "unexpected"),
    ([{"from_name": "mark_1", "to_name": "img_2", "type": "choices", "value": {"choices": ["yes"]}}], "attached"),
    ([{"from_name": "mark_1", "to_name": "img_1", "type": "choices", "value": {"choices": ["no"]}}], "expected"),
    ([{"from_name": "mark_1", "to_name": "img_1", "value": {"choices": ["yes"]}}] * 2, "twice"),
    ({"mark_1": "yes"}, "list"),
])
def test_unexpected_grid_results_are_bad_annotations(result, why):
    with pytest.raises(BadAnnotation, match=why):
        GRID.parse(result, _data(4))


def _tasks_rows(data: dict, task_id: int, gold: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{"task_id": task_id, "project_id": 1, "request_id": im["request_id"], "image_id": im["image_id"],
                          "wnid": W1, "kind": "grid", "is_gold": im["image_id"] in gold,
                          "gold_answer": gold.get(im["image_id"]), "pushed_at": pd.Timestamp.now(tz="UTC")}
                         for im in data["images"]])


def test_pull_maps_one_grid_annotation_to_one_vote_per_image():
    data = _data(4)
    tasks = _tasks_rows(data, 11, {"i3": "no"})
    ticks = GRID.render({"i0": "yes", "i2": "yes"}, data)
    export = [{"id": 11, "data": data, "annotations": [
        {"id": 101, "completed_by": 7, "result": ticks, "lead_time": 9.5, "created_at": "2026-11-26T10:00:00Z"},
        {"id": 102, "completed_by": 8, "result": [], "was_cancelled": True},  # skipped: not a vote
        {"id": 103, "completed_by": 8, "result": [{"from_name": "mark_40", "to_name": "img_40", "type": "choices",
                                                  "value": {"choices": ["yes"]}}]},
        {"id": 104, "completed_by": 9, "result": [], "lead_time": 3.0},  # nothing ticked: four no votes
    ]}]
    votes, quarantine = annotations_to_votes(export, project_id=1, tasks=tasks, seen=set(),
                                             worker_of={7: "a@x", 8: "b@x", 9: "c@x"}, key=b"k")
    assert len(votes) == 8 and not votes.duplicated(["annotation_id", "image_id"]).any()
    first = votes[votes["annotation_id"] == 101].set_index("image_id")
    assert first["answer"].to_dict() == {"i0": "yes", "i1": "no", "i2": "yes", "i3": "no"}
    assert first["is_gold"].to_dict() == {"i0": False, "i1": False, "i2": False, "i3": True}
    assert (first["lead_time_s"] == 9.5).all() and (first["task_id"] == 11).all()
    assert set(votes.loc[votes["annotation_id"] == 104, "answer"]) == {"no"}
    assert quarantine["annotation_id"].tolist() == [103] and "past" in quarantine["reason"].iloc[0]
    # A rerun over the same export adds nothing.
    seen = set(votes["annotation_id"]) | set(quarantine["annotation_id"])
    v2, q2 = annotations_to_votes(export, project_id=1, tasks=tasks, seen=seen, worker_of={}, key=b"k")
    assert v2.empty and q2.empty
    # Gold accuracy is scored per image of the grid: worker a was right on the i3 control, c too.
    wg = worker_gold(votes, tasks, min_n=1, min_accuracy=0.7).set_index("worker")
    assert wg["gold_n"].tolist() == [1, 1] and wg["gold_accuracy"].tolist() == [1.0, 1.0]


def test_pull_quarantines_a_grid_answer_for_an_image_the_task_does_not_hold():
    data = _data(3)
    tasks = _tasks_rows(data, 12, {}).iloc[:2]  # the tasks table knows only i0, i1
    export = [{"id": 12, "data": data, "annotations": [{"id": 201, "completed_by": 7, "result": []}]}]
    votes, quarantine = annotations_to_votes(export, project_id=1, tasks=tasks, seen=set(), worker_of={7: "a@x"},
                                             key=b"k")
    assert votes.empty and "i2" in quarantine["reason"].iloc[0]


# -- real server -----------------------------------------------------------------------------------------
def _grid_setup(ls, n_real: int, n_yes: int, n_no: int, *, grid_size: int, seed: int):
    from crowd.provision import image_dir_of, provision

    store = ls.new_store()
    images = make_images(store, n_real + n_yes + n_no, seed=seed)
    write_synsets(store)
    settings = ls.settings(store, grid_size=grid_size)
    client = ls.admin()
    pid = provision(client, settings, kinds=["grid"], overlap=1, image_dir=image_dir_of(store))["grid"]
    ids = images["image_id"].tolist()
    tench = "n01440764"
    plan = pd.DataFrame({"image_id": ids[:n_real], "wnid": tench, "n_more": 1})
    gold = pd.DataFrame({"image_id": ids[n_real:], "wnid": tench,
                         "answer": ["yes"] * n_yes + ["no"] * n_no, "source": "test"})
    store.write_table("gold", gold)
    truth = {(i, tench): ("yes" if k % 3 == 0 else "no") for k, i in enumerate(ids[:n_real])}
    truth.update({(g, tench): a for g, a in zip(gold["image_id"], gold["answer"], strict=True)})
    return store, settings, client, pid, plan, truth


@pytest.mark.slow
def test_real_server_grid_push_simulated_worker_pull_one_vote_per_image(labelstudio):  # noqa: F811
    from crowd.provision import find_project
    from crowd.pull import pull
    from crowd.push import push, server_tasks
    from crowd.simulate import Profile, work

    store, settings, client, pid, plan, truth = _grid_setup(labelstudio, 20, 4, 4, grid_size=13, seed=901)
    assert find_project(client, f"{settings.crowd.project_prefix} grid")["enable_empty_annotation"] is True
    out = push(store, client, settings, project_id=pid, kind="grid", plan=plan)
    # 20 candidates, 13 - 6 controls = 7 per grid: 3 grids of 6/7/7 candidates + 3 positives + 3 negatives each.
    assert (out["pushed"], out["images"], out["gold"]) == (3, 38, 18)
    assert push(store, client, settings, project_id=pid, kind="grid", plan=plan)["pushed"] == 0  # never twice
    tasks = store.read_table("tasks").to_pandas()
    assert len(tasks) == 38 and tasks["task_id"].nunique() == 3 and not tasks.duplicated(["task_id", "image_id"]).any()
    assert sorted(tasks.loc[~tasks["is_gold"], "image_id"]) == sorted(plan["image_id"])
    assert len(server_tasks(client, pid)) == 3

    [worker] = labelstudio.annotators([Profile(accuracy=1.0)])
    assert work([worker], pid, truth) == {worker.email: 3}
    first = pull(store, client, settings, project_ids=[pid])
    assert (first["new_votes"], first["quarantined"]) == (38, 0)
    votes = store.read_table("votes").to_pandas()
    assert len(votes) == 38 and votes["annotation_id"].nunique() == 3
    assert not votes.duplicated(["annotation_id", "image_id"]).any()
    merged = votes.merge(tasks, on=["task_id", "image_id"], suffixes=("", "_t"))
    assert len(merged) == 38 and (merged["is_gold"] == merged["is_gold_t"]).all()
    assert all(a == truth[(i, w)] for i, w, a in zip(votes["image_id"], votes["wnid"], votes["answer"], strict=True))
    assert pull(store, client, settings, project_ids=[pid])["new_votes"] == 0
    wg = store.read_table("worker_gold").to_pandas()
    assert wg["gold_n"].tolist() == [18] and wg["gold_accuracy"].tolist() == [1.0]


@pytest.mark.slow
def test_real_server_grid_push_crash_after_import_is_adopted_not_pushed_again(labelstudio, monkeypatch):  # noqa: F811
    from crowd.push import push, server_tasks

    store, settings, client, pid, plan, _ = _grid_setup(labelstudio, 10, 2, 2, grid_size=8, seed=902)
    crash_before_tasks_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        push(store, client, settings, project_id=pid, kind="grid", plan=plan)
    monkeypatch.undo()
    n_server = len(server_tasks(client, pid))
    assert n_server >= 1 and not store.has_table("tasks")
    out = push(store, client, settings, project_id=pid, kind="grid", plan=plan)
    tasks = store.read_table("tasks").to_pandas()
    assert out["adopted"] == len(tasks) and len(server_tasks(client, pid)) == tasks["task_id"].nunique()
    assert sorted(tasks.loc[~tasks["is_gold"], "image_id"]) == sorted(plan["image_id"])
