"""The box loop against a real Label Studio server with three simulated box workers (slow)."""

from __future__ import annotations

import pandas as pd
import pytest

from crowd.boxes import adopt, provision_boxes, run_until_done, sync
from crowd.simulate import Profile
from crowd.simulate_boxes import WorkerProfile, evaluate, make_truth, write_world
from pipeline.boxes import BOX_COLUMNS, BoxesSettings, iou_matrix

pytestmark = pytest.mark.slow

CAREFUL = [WorkerProfile(f"careful-{i}", jitter=0.01, p_sloppy=0.0, p_wrong=0.0, p_invalid=0.0, quality_error=0.0,
                         coverage_error=0.0) for i in range(3)]


def box_world(ls, n_images: int, seed: int):
    """A fresh store under the server's files root holding `n_images` generated images with their true boxes."""
    store = ls.new_store()
    pairs, truth = write_world(store, *make_truth(n_images, seed=seed))
    return store, pairs, truth, ls.settings(store)


def test_three_simulated_workers_box_a_handful_of_images(labelstudio):  # noqa: F811
    store, pairs, truth, settings = box_world(labelstudio, 4, seed=21)
    admin = labelstudio.admin()
    policy = BoxesSettings()

    # crash between the import call and the table write: the next sync adopts the tasks, pushes nothing twice
    first = sync(store, settings, client=admin, policy=policy)
    assert first["pushed"] == len(pairs)
    pushed_rows = store.read_table("box_tasks").to_pandas()
    store.delete_table("box_tasks")
    again = sync(store, settings, client=admin, policy=policy)
    assert again["pushed"] == 0
    adopted = store.read_table("box_tasks").to_pandas()
    assert sorted(adopted["task_id"]) == sorted(pushed_rows["task_id"])
    assert sorted(adopted["request_id"]) == sorted(pushed_rows["request_id"])

    annotators = labelstudio.annotators([Profile()] * 3)
    out = run_until_done(store, settings, list(zip(annotators, CAREFUL, strict=True)), truth, client=admin,
                         policy=policy, seed=3)
    cov = store.read_table("coverage").to_pandas()
    assert len(cov) == len(pairs)
    assert cov["covered"].all() and (cov["state"] == "done").all(), cov
    boxes = store.read_table("boxes").to_pandas()
    accepted = boxes[boxes["verified"] == "accepted"]
    assert len(accepted) == len(truth)  # careful workers: one accepted box per object, nothing else
    for key, g in accepted.groupby(["image_id", "wnid"]):
        t = truth[(truth["image_id"] == key[0]) & (truth["wnid"] == key[1])][BOX_COLUMNS].to_numpy()
        m = iou_matrix(g[BOX_COLUMNS].to_numpy(), t)
        assert (m.max(axis=1) >= 0.85).all()  # pixel boxes from Label Studio percent match the truth
    answers = store.read_table("box_answers").to_pandas()
    assert answers["annotation_id"].is_unique
    assert answers["worker"].nunique() == 3 and answers["worker"].str.startswith("w-").all()  # pseudonyms only
    assert not answers["worker"].str.contains("@").any()
    m = evaluate(cov, boxes, truth)
    assert m["truly_covered_share"] == 1.0 and m["tight_share"] == 1.0
    print("real-server box run:", out, m)

    # rerun: nothing new pulled or pushed, tables unchanged
    before = {n: store.read_table(n) for n in ("box_tasks", "box_answers", "boxes", "coverage")}
    rerun = sync(store, settings, client=admin, policy=policy)
    assert (rerun["pulled"], rerun["pushed"]) == (0, 0)
    assert all(store.read_table(n).equals(before[n]) for n in before)


def test_unusable_drawing_is_recorded_with_its_reason_and_redrawn(labelstudio):  # noqa: F811
    from crowd.simulate import next_task, submit

    store, pairs, truth, settings = box_world(labelstudio, 1, seed=5)
    admin = labelstudio.admin()
    sync(store, settings, client=admin)
    (worker,) = labelstudio.annotators([Profile()])
    projects = provision_boxes(admin, settings, store)
    task = next_task(worker.client, projects["draw"])
    rotated = [{"from_name": "box", "to_name": "image", "type": "rectangle", "original_width": 10, "original_height": 10,
                "image_rotation": 0, "value": {"x": 10, "y": 10, "width": 30, "height": 20, "rotation": 40}}]
    submit(worker.client, int(task["id"]), projects["draw"], rotated, 3.0)
    out = sync(store, settings, client=admin)
    answers = store.read_table("box_answers").to_pandas()
    assert len(answers) == 1 and answers.iloc[0]["answer"] == "invalid"
    assert "rotated by 40 degrees" in answers.iloc[0]["reject_reason"]
    assert pd.isna(answers.iloc[0]["x_min"])
    tasks, _ = adopt(store, admin, projects)
    assert out["pushed"] == 1 and list(tasks.sort_values("seq")["kind"]) == ["draw", "draw"]  # a redraw


def test_boxes_dag_runs_the_reconcile_loop(labelstudio, airflow_db, monkeypatch):  # noqa: F811
    from conftest import run_dag

    from crowd.boxes import run_until_done

    store, pairs, truth, settings = box_world(labelstudio, 2, seed=8)
    for k, v in {"TOKEN": labelstudio.token, "PSEUDONYM_KEY": "test-pseudonym-key"}.items():
        monkeypatch.setenv(f"SYNSETFORGE__CROWD__{k}", v)
    conf = {"store": str(store.root), "url": labelstudio.url, "project_prefix": settings.crowd.project_prefix,
            "files_root": str(labelstudio.files_root)}
    assert run_dag("synsetforge_boxes", conf).state == "success"
    tasks = store.read_table("box_tasks").to_pandas()
    assert sorted(tasks["kind"]) == ["draw", "draw"] and set(tasks["seq"]) == {0}
    assert run_dag("synsetforge_boxes", conf).state == "success"  # nothing answered: nothing new
    assert store.read_table("box_tasks").num_rows == 2
    # workers finish the loop through the library; the DAG then sees a finished, covered loop
    annotators = labelstudio.annotators([Profile()] * 3)
    run_until_done(store, settings, list(zip(annotators, CAREFUL, strict=True)), truth, client=labelstudio.admin())
    assert run_dag("synsetforge_boxes", conf).state == "success"
    cov = store.read_table("coverage").to_pandas()
    assert cov["covered"].all() and (cov["state"] == "done").all()
