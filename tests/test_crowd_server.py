"""crowd/ against a real Label Studio server: push, simulated annotators, pull, gold, faults, CLI, DAG."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from fixtures_labelstudio import crash_before_tasks_write, make_images, write_synsets

from crowd import push as push_mod
from crowd.client import CrowdError
from crowd.kinds import choices_result
from crowd.provision import find_project, image_dir_of, kind_project_ids, provision
from crowd.pull import pull
from crowd.push import push, server_tasks
from crowd.simulate import Profile, work

pytestmark = pytest.mark.slow
TENCH = "n01440764"


def _setup(ls, n_real: int, n_gold: int, **crowd):
    store = ls.new_store()
    images = make_images(store, n_real + n_gold, seed=n_real * 100 + n_gold)
    write_synsets(store)
    settings = ls.settings(store, **crowd)
    client = ls.admin()
    pid = provision(client, settings, image_dir=image_dir_of(store))["verify"]
    ids = images["image_id"].tolist()
    plan = pd.DataFrame({"image_id": ids[:n_real], "wnid": TENCH, "n_more": 3})
    gold = pd.DataFrame({"image_id": ids[n_real:], "wnid": TENCH,
                         "answer": ["yes" if i % 2 else "no" for i in range(n_gold)], "source": "test"})
    store.write_table("gold", gold)
    truth = {(i, TENCH): ("yes" if k % 3 else "no") for k, i in enumerate(ids[:n_real])}
    truth.update({(g, TENCH): a for g, a in zip(gold["image_id"], gold["answer"], strict=True)})
    return store, settings, client, pid, plan, truth


def test_push_50_tasks_overlap_3_three_workers_pull_150_votes(labelstudio, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    store, settings, client, pid, plan, truth = _setup(labelstudio, 30, 20, gold_rate=0.4)
    out = push(store, client, settings, project_id=pid, plan=plan)
    assert (out["pushed"], out["gold"]) == (50, 20)
    assert push(store, client, settings, project_id=pid, plan=plan)["pushed"] == 0  # same plan again: nothing
    assert provision(client, settings, image_dir=image_dir_of(store))["verify"] == pid  # idempotent

    tasks = store.read_table("tasks").to_pandas()
    assert len(tasks) == 50 and tasks["task_id"].is_unique and tasks["request_id"].is_unique
    assert len(server_tasks(client, pid)) == 50

    invite = client.get_json("/api/invite")["token"]
    workers = labelstudio.annotators([Profile(accuracy=0.9), Profile(kind="spammer"), Profile(accuracy=0.75)])
    assert client.get_json("/api/invite")["token"] != invite  # rotated after use
    assert invite not in caplog.text
    done = work(workers, pid, truth, seed=3)
    assert sorted(done.values()) == [50, 50, 50]

    first = pull(store, client, settings, project_ids=[pid])
    assert first["new_votes"] == 150 and first["quarantined"] == 0
    votes = store.read_table("votes").to_pandas()
    assert len(votes) == 150 and votes["annotation_id"].is_unique
    assert votes["worker"].nunique() == 3 and votes["worker"].str.fullmatch(r"w-[0-9a-f]{16}").all()
    assert votes.groupby("task_id").size().eq(3).all()
    assert votes["lead_time_s"].notna().all() and votes["is_gold"].sum() == 60
    assert pull(store, client, settings, project_ids=[pid])["new_votes"] == 0
    assert len(store.read_table("votes")) == 150

    wg = store.read_table("worker_gold").to_pandas()
    from crowd.pull import pseudonym

    acc = {w.profile.kind + str(w.profile.accuracy): wg.set_index("worker").loc[pseudonym(w.email, b"test-pseudonym-key")]
           for w in workers}
    assert abs(acc["spammer0.9"]["gold_accuracy"] - 0.5) <= 0.25
    assert acc["honest0.9"]["gold_accuracy"] >= 0.75 and not acc["honest0.9"]["flagged"]
    assert acc["honest0.75"]["gold_accuracy"] >= 0.55
    assert (wg["gold_n"] == 20).all()

    # No secret and no email in any table or log line.
    blobs = b"".join(store.get(k) for k in store.list("tables/"))
    for w in workers:
        assert w.email.encode() not in blobs
    assert labelstudio.token.encode() not in blobs
    assert labelstudio.token not in caplog.text


def test_crash_after_import_before_table_write_is_reconciled(labelstudio, monkeypatch):  # noqa: F811
    store, settings, client, pid, plan, _ = _setup(labelstudio, 6, 0, gold_rate=0.0)
    crash_before_tasks_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        push(store, client, settings, project_id=pid, plan=plan)
    monkeypatch.undo()
    assert not store.has_table("tasks") and len(server_tasks(client, pid)) == 6
    out = push(store, client, settings, project_id=pid, plan=plan)
    assert out["adopted"] == 6 and out["pushed"] == 0
    assert len(store.read_table("tasks")) == 6 and len(server_tasks(client, pid)) == 6


def test_crash_before_import_is_resumed(labelstudio, monkeypatch):  # noqa: F811
    store, settings, client, pid, plan, _ = _setup(labelstudio, 5, 0, gold_rate=0.0)

    def down(*a, **k):
        raise CrowdError("simulated: server went away before the import")

    monkeypatch.setattr(push_mod, "_import_batch", down)
    with pytest.raises(CrowdError):
        push(store, client, settings, project_id=pid, plan=plan)
    monkeypatch.undo()
    assert len(store.read_table("push_requests")) == 5 and len(server_tasks(client, pid)) == 0
    out = push(store, client, settings, project_id=pid, plan=plan)
    assert out["pushed"] == 5 and out["resumed"] == 5
    assert server_tasks(client, pid)["request_id"].is_unique


def test_unexpected_annotation_is_quarantined_not_fatal(labelstudio):  # noqa: F811
    store, settings, client, pid, plan, truth = _setup(labelstudio, 3, 0, gold_rate=0.0)
    push(store, client, settings, project_id=pid, plan=plan)
    tasks = store.read_table("tasks").to_pandas()
    [w] = labelstudio.annotators([Profile(accuracy=1.0)])
    tid = int(tasks["task_id"].iloc[0])
    bad = w.client.request("POST", f"/api/tasks/{tid}/annotations/", json={
        "result": choices_result("maybe"), "project": pid, "lead_time": 1.0}).json()["id"]
    w.client.request("POST", f"/api/tasks/{int(tasks['task_id'].iloc[1])}/annotations/", json={
        "result": choices_result("yes"), "project": pid, "lead_time": 2.0})
    out = pull(store, client, settings, project_ids=[pid])
    assert (out["new_votes"], out["quarantined"]) == (1, 1)
    q = store.read_table("quarantine").to_pandas()
    assert q["annotation_id"].tolist() == [bad] and "maybe" in q["reason"].iloc[0]
    again = pull(store, client, settings, project_ids=[pid])
    assert (again["new_votes"], again["quarantined"]) == (0, 0)


def test_server_stopped_and_restarted_loses_and_duplicates_nothing(labelstudio):  # noqa: F811
    if labelstudio.server.service is None:
        pytest.skip("external server: cannot restart it")
    store, settings, client, pid, plan, truth = _setup(labelstudio, 8, 2, gold_rate=0.2)
    first = plan.head(4)
    push(store, client, settings, project_id=pid, plan=first)
    workers = labelstudio.annotators([Profile(accuracy=1.0), Profile(accuracy=1.0)])
    work(workers, pid, truth)
    labelstudio.server.stop()
    fast = labelstudio.admin(retries=2, backoff_s=0.05)
    with pytest.raises(CrowdError, match="did not answer .* after 3 tries.*rerun"):
        pull(store, fast, settings, project_ids=[pid])
    with pytest.raises(CrowdError, match="did not answer"):
        push(store, fast, settings, project_id=pid, plan=plan)
    labelstudio.server.restart()
    out = push(store, client, settings, project_id=pid, plan=plan)
    assert out["pushed"] >= 4
    for w in workers:  # sessions survive; tokens are in the DB
        w.client._http.cookies.clear()
    work(workers, pid, truth)
    pull(store, client, settings, project_ids=[pid])
    tasks = store.read_table("tasks").to_pandas()
    remote = server_tasks(client, pid)
    assert len(tasks) == len(remote) and remote["request_id"].is_unique
    votes = store.read_table("votes").to_pandas()
    assert votes["annotation_id"].is_unique and len(votes) == 2 * len(tasks)


def test_cli_push_pull_status(labelstudio, monkeypatch, capsys):  # noqa: F811
    from pipeline.cli import main

    store, settings, client, pid, plan, truth = _setup(labelstudio, 4, 0, gold_rate=0.0)
    plan_file = store.root / "plan.csv"
    plan.to_csv(plan_file, index=False)
    for k, v in {"URL": labelstudio.url, "TOKEN": labelstudio.token, "PSEUDONYM_KEY": "k",
                 "FILES_ROOT": str(labelstudio.files_root), "PROJECT_PREFIX": settings.crowd.project_prefix}.items():
        monkeypatch.setenv(f"SYNSETFORGE__CROWD__{k}", v)
    assert main(["--store", str(store.root), "crowd", "push", "--plan", str(plan_file)]) == 0
    assert "pushed 4 task(s)" in capsys.readouterr().out
    work(labelstudio.annotators([Profile(accuracy=1.0)]), pid, truth)
    assert main(["--store", str(store.root), "crowd", "pull"]) == 0
    assert "pulled 4 new vote(s)" in capsys.readouterr().out
    assert main(["--store", str(store.root), "crowd", "status"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if TENCH in line)
    assert [c.strip() for c in row.strip("|").split("|")][:2] == [TENCH, "4"]  # 4 tasks for tench
    assert "quarantined annotations: 0" in out and labelstudio.token not in out
    assert main(["--store", str(store.root), "crowd", "push", "--plan", str(store.root / "nope.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_crowd_dag_pull_aggregate_push(labelstudio, airflow_db, monkeypatch):  # noqa: F811
    from conftest import run_dag

    store, settings, client, pid, plan, truth = _setup(labelstudio, 4, 0, gold_rate=0.0)
    store.write_table("image_links", plan[["image_id", "wnid"]].assign(
        url="http://example.org/x.jpg", source="test", rank=1, n_urls=1, n_synsets=1, multi_synset=False,
        near_duplicate_of=None))
    for k, v in {"TOKEN": labelstudio.token, "PSEUDONYM_KEY": "k"}.items():
        monkeypatch.setenv(f"SYNSETFORGE__CROWD__{k}", v)
    conf = {"store": str(store.root), "url": labelstudio.url, "project_prefix": settings.crowd.project_prefix,
            "files_root": str(labelstudio.files_root)}
    run = run_dag("synsetforge_crowd", conf)
    assert run.state == "success"
    assert len(store.read_table("tasks")) >= 4
    [worker] = labelstudio.annotators([Profile(accuracy=1.0)])
    for project in kind_project_ids(client, settings, "verify", store):  # QC's n_more picks the project's overlap
        work([worker], project, truth)
    assert run_dag("synsetforge_crowd", conf).state == "success"
    assert len(store.read_table("votes")) >= 4
    assert find_project(client, f"{settings.crowd.project_prefix} verify")["id"] == pid


def _reconcile_until_settled(ls, store, settings, truth, workers, *, during_first_run=None, max_rounds: int = 8):
    """The crowd DAG (pull -> QC -> push -> settled) run by dag.test() with the annotators working in between."""
    from datetime import timedelta

    from pipeline.airflow_local import run_dag_test

    conf = {"store": str(store.root), "url": ls.url, "project_prefix": settings.crowd.project_prefix,
            "files_root": str(ls.files_root)}
    states = []
    for rnd in range(max_rounds):
        # Retries 15 s apart: long enough for a restarting Label Studio to come back within the task's retries.
        run = run_dag_test("synsetforge_crowd", conf, retry_delay=timedelta(seconds=15))
        states.append({ti.task_id: (ti.state, ti.try_number) for ti in run.get_task_instances()})
        assert run.state == "success", states[-1]
        if rnd == 0 and during_first_run:
            during_first_run.join(timeout=300)
        if states[-1]["settled"][0] == "success":  # published the labels Asset
            assert len(states) > 1 and all(st["settled"][0] == "skipped" for st in states[:-1])
            return states
        for pid in kind_project_ids(ls.admin(), settings, "verify", store):  # one project per overlap asked
            work(workers, pid, truth, seed=rnd)
    raise AssertionError(f"not settled after {max_rounds} rounds: {states}")


def test_label_studio_restarting_during_the_reconcile_loop_ends_as_a_clean_loop(labelstudio, airflow_db,  # noqa: F811
                                                                              monkeypatch):
    """Label Studio goes away between QC and push inside a DAG run and comes back while push is retried; the loop
    then ends with the same labels, votes per image and tasks as a loop where nothing happened."""
    import threading

    from pipeline.qc import stage as qc_stage

    if labelstudio.server.service is None:
        pytest.skip("external server: cannot restart it")
    for k, v in {"TOKEN": labelstudio.token, "PSEUDONYM_KEY": "k"}.items():
        monkeypatch.setenv(f"SYNSETFORGE__CROWD__{k}", v)
    ends = {}
    for name in ("clean", "restarted"):
        store = labelstudio.new_store()
        images = make_images(store, 6, seed=4242)  # same bytes in both stores: same image ids
        write_synsets(store)
        ids = images["image_id"].tolist()
        store.write_table("image_links", pd.DataFrame({
            "image_id": ids, "wnid": TENCH, "url": [f"http://example.org/{i}.jpg" for i in ids], "source": "test",
            "rank": range(1, 7), "n_urls": 1, "n_synsets": 1, "multi_synset": False, "near_duplicate_of": None}))
        settings = labelstudio.settings(store, gold_rate=0.0)
        truth = {(i, TENCH): ("yes" if k % 3 else "no") for k, i in enumerate(ids)}
        workers = labelstudio.annotators([Profile(accuracy=1.0)] * 3)
        restarter, pid_before = None, labelstudio.server.pid
        if name == "restarted":
            real_run_qc = qc_stage.run_qc
            restarter = threading.Thread(target=labelstudio.server.restart, daemon=True)

            def run_qc_then_lose_the_server(*args, _real=real_run_qc, _restarter=restarter, **kwargs):
                out = _real(*args, **kwargs)
                if _restarter.ident is None:  # the first time only
                    labelstudio.server.stop()  # gone before push: push fails until the restart is done
                    _restarter.start()
                return out

            monkeypatch.setattr(qc_stage, "run_qc", run_qc_then_lose_the_server)
        states = _reconcile_until_settled(labelstudio, store, settings, truth, workers, during_first_run=restarter)
        if name == "restarted":
            # push met a server that was gone; its client retries (and the task's, if the restart is slow) waited
            assert restarter.ident is not None and not restarter.is_alive()
            assert labelstudio.server.pid != pid_before, "Label Studio was not restarted"
            assert states[0]["push_tasks"][0] == "success"
        client = labelstudio.admin()
        tasks, votes = store.read_table("tasks").to_pandas(), store.read_table("votes").to_pandas()
        remote = pd.concat([server_tasks(client, p) for p in kind_project_ids(client, settings, "verify", store)])
        assert len(remote) == len(tasks) and remote["request_id"].is_unique and tasks["request_id"].is_unique
        assert votes["annotation_id"].is_unique
        labels = store.read_table("labels").to_pandas()
        ends[name] = {
            "labels": sorted(zip(labels.image_id, labels.wnid, labels.status, strict=True)),
            "votes_per_image": votes.groupby("image_id").size().sort_index().to_dict(),
            "tasks": len(tasks),
        }
        assert {(i, w): ("yes" if s == "accepted" else "no") for i, w, s in ends[name]["labels"]} == truth
    assert ends["restarted"] == ends["clean"]


def test_a_simulated_annotator_skips_a_pair_it_already_judged(labelstudio):  # noqa: F811
    """QC counts one vote per worker and pair, so a repeated pair is skipped (Label Studio's Skip) by whoever
    judged it and answered by someone else; the skip never becomes a vote."""
    store, settings, client, _, plan, truth = _setup(labelstudio, 1, 0, gold_rate=0.0)
    pid = provision(client, settings, overlap=1, store=store)["verify"]  # the plan asks one vote: a project of 1
    one = plan.assign(n_more=1)
    a, b = labelstudio.annotators([Profile(accuracy=1.0), Profile(accuracy=1.0)])
    assert push(store, client, settings, project_id=pid, plan=one)["pushed"] == 1
    assert work([a], pid, truth) == {a.email: 1}
    pull(store, client, settings, project_ids=[pid])
    assert push(store, client, settings, project_id=pid, plan=one)["pushed"] == 1  # a second task, same pair
    assert work([a], pid, truth) == {a.email: 0}  # skipped: a has judged this pair
    assert work([b], pid, truth) == {b.email: 1}
    assert work([a, b], pid, truth) == {a.email: 0, b.email: 0}  # nothing left for either
    pull(store, client, settings, project_ids=[pid])
    votes = store.read_table("votes").to_pandas()
    assert len(votes) == 2 and votes["worker"].nunique() == 2
    anns = [ann for t in client.export_json(pid) for ann in t["annotations"]]
    assert sum(bool(x.get("was_cancelled")) for x in anns) == 1
