"""DET against a real Label Studio with simulated annotators (slow): the presence loop (questions and checklists,
controls, a crash between import and table write), then boxes for every present class by extreme clicking and by
drawing, a DET release built from what the crowd did, its devkit export and its evaluation; the two DAGs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crowd.presence import det_box_pairs, det_tables, provision_presence, run_until_done, sync, sync_det_boxes
from crowd.simulate import Profile
from crowd.simulate_boxes import WorkerProfile
from crowd.simulate_presence import Crowd, write_det_world
from pipeline.boxes import BOX_COLUMNS, iou_matrix

pytestmark = pytest.mark.slow
PERFECT = Crowd(np.ones(20), np.zeros(20, dtype=bool))  # presence decided without a mistake

DET13 = ["n02084071", "n02121808", "n02374451", "n02958343", "n02834778", "n02691156", "n03001627", "n04379243",
         "n03614007", "n03793489", "n03782190", "n07753592", "n07739125"]
CAREFUL_BOXES = [WorkerProfile(f"careful-{i}", jitter=0.01, click_jitter=0.005, p_sloppy=0.0, p_wrong=0.0,
                               p_invalid=0.0, quality_error=0.0, coverage_error=0.0) for i in range(3)]


def det_store(ls, tmp_path, n_images: int, *, seed: int, n_gold: int = 0, **det):
    """A store under the server's files root with the DET13 vocabulary and `n_images` rendered images."""
    from pipeline.cli import main

    store = ls.new_store()
    wnids = tmp_path / "det.txt"
    wnids.write_text("\n".join(DET13) + "\n")
    assert main(["--store", str(store.root), "vocab", "--wnid-file", str(wnids), "--det", "--no-multilingual"]) == 0
    truth = write_det_world(store, n_images, seed=seed, n_gold=n_gold, max_objects=2)
    settings = ls.settings(store)
    settings.det = settings.det.model_copy(update={"initial_votes": 2, "max_votes": 5, **det})
    return store, truth, settings


def box_workers(ls, n=3):
    return list(zip(ls.annotators([Profile()] * n), CAREFUL_BOXES[:n], strict=True))


@pytest.mark.parametrize("scheme", ["checklist", "question"])
def test_presence_loop_annotates_every_class_of_every_image(labelstudio, tmp_path, scheme):  # noqa: F811
    store, truth, settings = det_store(labelstudio, tmp_path, 3, seed=11 if scheme == "checklist" else 12,
                                       n_gold=1, scheme=scheme)
    admin = labelstudio.admin()

    # a crash between the import call and the table write: the next sync adopts the tasks and pushes nothing twice
    first = sync(store, settings, client=admin)
    assert first["pushed"] > 0
    pushed = store.read_table("presence_tasks").to_pandas()
    assert pushed["is_gold"].any() and not pushed["is_gold"].all()  # controls mixed in
    assert set(pushed.loc[pushed["is_gold"], "image_id"]) == set(truth.world.gold_ids)
    if scheme == "checklist":
        assert (pushed["kind"] == "checklist").all() and pushed["node_ids"].map(len).min() > 1
    else:
        assert (pushed["kind"] == "question").all() and (pushed["node_ids"].map(len) == 1).all()
    store.delete_table("presence_tasks")
    again = sync(store, settings, client=admin)
    assert again["pushed"] == 0
    adopted = store.read_table("presence_tasks").to_pandas()
    assert sorted(adopted["request_id"]) == sorted(pushed["request_id"])
    gold_rows = adopted[adopted["is_gold"]]
    answers = dict(zip(zip(truth.world.gold_table()["image_id"], truth.world.gold_table()["node_id"], strict=True),
                       truth.world.gold_table()["answer"], strict=True))
    for r in gold_rows.itertuples():  # a control's known answers are rebuilt from presence_gold, never task data
        assert list(r.gold_answers) == [answers[(r.image_id, n)] for n in r.node_ids]
    projects = provision_presence(admin, settings, store)
    for t in admin.iter_tasks(projects[scheme], fields="all"):
        assert "gold_answers" not in t["data"] and "yes" not in str(t["data"].get("items"))

    annotators = labelstudio.annotators([Profile(accuracy=1.0)] * 5)
    out = run_until_done(store, settings, annotators, truth.present_nodes(), client=admin, seed=3)
    images = store.read_table("det_images").to_pandas().set_index("image_id")
    assert (images["state"] == "done").all() and set(images.index) == set(truth.world.image_ids)
    tree = truth.world.tree
    for k, image_id in enumerate(truth.world.image_ids):
        want = sorted(tree.ids[c] for c in tree.classes if truth.world.present[k, c])
        assert list(images.loc[image_id, "present"]) == want
    # every class decided, some without being asked: a "no" higher up cleared them
    assert (images["n_decided"] == len(DET13)).all()
    labels = store.read_table("presence_labels").to_pandas()
    asked_classes = labels[labels["is_class"]].groupby("image_id").size().reindex(images.index, fill_value=0)
    assert (asked_classes < len(DET13)).all(), asked_classes
    assert (labels["status"] != "pending").all()
    votes = store.read_table("presence_votes").to_pandas()
    assert votes["worker"].str.startswith("w-").all() and not votes["worker"].str.contains("@").any()
    assert votes["is_gold"].any()
    assert not pd.DataFrame(votes).duplicated(["annotation_id", "node_id"]).any()
    print(f"presence ({scheme}) on the real server:", {k: v for k, v in out.items() if k != "projects"})

    before = {n: store.read_table(n) for n in ("presence_tasks", "presence_votes", "presence_labels", "det_images")}
    rerun = sync(store, settings, client=admin)
    assert (rerun["pulled"], rerun["pushed"]) == (0, 0)
    assert all(store.read_table(n).equals(before[n]) for n in before)


@pytest.mark.parametrize("box_kind", ["extreme", "draw"])
def test_every_present_class_is_boxed_then_released_and_evaluated(labelstudio, tmp_path, box_kind):  # noqa: F811
    from crowd.simulate_presence import run_inprocess
    from pipeline.evaluate import evaluate, ground_truth_from_release
    from pipeline.release.det import build_det_release, export_det_devkit
    from pipeline.release.manifest import verify_release

    store, truth, settings = det_store(labelstudio, tmp_path, 4, seed=21 if box_kind == "extreme" else 22,
                                       box_kind=box_kind)
    # presence in-process (the previous test runs it on the server): the loop's tables as the server run leaves them
    res = run_inprocess(truth.world, settings.det, seed=1, crowd=PERFECT)
    for name, df in (("presence_tasks", res.tasks), ("presence_votes", res.votes), ("presence_labels", res.labels),
                     ("det_images", res.images)):
        store.write_table(name, df)
    pairs = det_box_pairs(store)  # every present class of every fully annotated image
    want = truth.pairs[["image_id", "wnid"]].sort_values(["image_id", "wnid"]).to_numpy().tolist()
    assert pairs[["image_id", "wnid"]].sort_values(["image_id", "wnid"]).to_numpy().tolist() == want
    admin = labelstudio.admin()
    from crowd.boxes import run_until_done as boxes_until_done

    out = boxes_until_done(store, settings, box_workers(labelstudio), truth.boxes, client=admin, pairs=pairs,
                           seed=5, tables=det_tables(settings))
    tables = det_tables(settings)
    tasks = store.read_table(tables.tasks).to_pandas()
    assert set(tasks["kind"]) == {box_kind, "quality", "coverage"}
    assert tasks["request_id"].str.startswith("detbox:").all()
    assert not store.has_table("box_tasks")  # the DET loop keeps out of the classification box tables
    cov = store.read_table(tables.coverage).to_pandas()
    assert len(cov) == len(pairs) and cov["covered"].all() and (cov["state"] == "done").all(), cov
    boxes = store.read_table(tables.boxes).to_pandas()
    accepted = boxes[boxes["verified"] == "accepted"]
    for key, g in accepted.groupby(["image_id", "wnid"]):
        t = truth.boxes[(truth.boxes["image_id"] == key[0]) & (truth.boxes["wnid"] == key[1])][BOX_COLUMNS].to_numpy()
        assert len(g) == len(t) and (iou_matrix(g[BOX_COLUMNS].to_numpy(), t).max(axis=1) >= 0.85).all()
    print(f"DET boxes ({box_kind}) on the real server:", {k: v for k, v in out.items() if k != "projects"})
    again = sync_det_boxes(store, settings, client=admin)
    assert (again["pulled"], again["pushed"]) == (0, 0)

    m = build_det_release(store, "det-1", val=2, test=1)
    assert m["task"] == "det" and sum(m["splits"].values()) == len(truth.world.image_ids)
    assert verify_release(store, "det-1").ok
    counts = export_det_devkit(store, "det-1", tmp_path / "devkit")
    assert counts["val"] == 2 and counts["xml"] == counts["train"] + counts["val"]
    gt = ground_truth_from_release(store, "det-1", "val")
    perfect = tmp_path / "perfect.txt"
    perfect.write_text("".join(f"{gt.order.index(r.image_id) + 1} {r.cls} 0.9 {r.x_min} {r.y_min} {r.x_max} {r.y_max}\n"
                               for r in gt.boxes.itertuples()))
    assert evaluate("det", perfect, gt)["mean_ap"] == 1.0
    shifted = tmp_path / "shifted.txt"  # every box moved by its own width: no detection matches
    shifted.write_text("".join(f"{gt.order.index(r.image_id) + 1} {r.cls} 0.9 {r.x_max} {r.y_min} "
                               f"{2 * r.x_max - r.x_min} {r.y_max}\n" for r in gt.boxes.itertuples()))
    assert evaluate("det", shifted, gt)["mean_ap"] == 0.0


def test_presence_and_det_box_dags_run_the_loops(labelstudio, airflow_db, tmp_path, monkeypatch):  # noqa: F811
    from conftest import run_dag

    store, truth, settings = det_store(labelstudio, tmp_path, 2, seed=31)
    for k, v in {"TOKEN": labelstudio.token, "PSEUDONYM_KEY": "test-pseudonym-key"}.items():
        monkeypatch.setenv(f"SYNSETFORGE__CROWD__{k}", v)
    for k, v in {"INITIAL_VOTES": "2", "MAX_VOTES": "5"}.items():
        monkeypatch.setenv(f"SYNSETFORGE__DET__{k}", v)
    conf = {"store": str(store.root), "url": labelstudio.url, "project_prefix": settings.crowd.project_prefix,
            "files_root": str(labelstudio.files_root)}
    run = run_dag("synsetforge_presence", conf)
    assert run.state == "success"
    tasks = store.read_table("presence_tasks").to_pandas()
    assert len(tasks) > 0 and set(tasks["image_id"]) == set(truth.world.image_ids)
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states["settled"] == "skipped"  # questions are out: nothing is settled yet
    assert run_dag("synsetforge_presence", conf).state == "success"  # nothing answered: nothing new
    assert store.read_table("presence_tasks").num_rows == len(tasks)
    annotators = labelstudio.annotators([Profile(accuracy=1.0)] * 5)
    run_until_done(store, settings, annotators, truth.present_nodes(), client=labelstudio.admin(), seed=2)
    images = store.read_table("det_images").to_pandas()
    assert (images["state"] == "done").all()
    run = run_dag("synsetforge_det_boxes", conf)
    assert run.state == "success"
    box_tasks = store.read_table("det_box_tasks").to_pandas()
    assert sorted(set(box_tasks["kind"])) == ["extreme"] and len(box_tasks) == len(det_box_pairs(store))
    assert np.all(box_tasks["seq"] == 0)
