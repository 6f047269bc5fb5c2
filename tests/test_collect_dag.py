"""The collect DAG runs end to end with dag.test(): plan -> mapped collect -> merge -> mapped ingest -> merge."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import run_dag
from PIL import Image

from pipeline.store import open_store

pytestmark = pytest.mark.slow


def synsets_frame(wnids):
    return pd.DataFrame({"wnid": wnids, "name": [f"s{i}.n.01" for i in range(len(wnids))], "lemmas": [["x"]] * len(wnids),
                         "gloss": ["g"] * len(wnids), "depth": [1] * len(wnids), "parent_wnids": [[]] * len(wnids),
                         "lexname": ["noun.animal"] * len(wnids), "is_leaf": [True] * len(wnids),
                         "queries": [["x"]] * len(wnids)})


def photo_folders(root, n_classes: int, per_class: int, seed: int) -> list[str]:
    """One folder of random JPEGs per wnid (the local_dir source's layout); returns the wnids."""
    wnids = [f"n0000000{i}" for i in range(1, n_classes + 1)]
    rng = np.random.default_rng(seed)
    for w in wnids:
        (root / w).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(root / w / f"{j}.jpg")
    return wnids


def test_collect_dag_maps_over_shards_and_writes_tables(airflow_db, tmp_path):
    wnids = photo_folders(tmp_path / "imgs", 5, 3, seed=0)
    (tmp_path / "imgs" / wnids[0] / "junk.jpg").write_bytes(b"not an image")
    store = open_store(tmp_path / "store")
    store.write_table("synsets", synsets_frame(wnids))
    conf = {"sources": ["local_dir"], "local_dir": str(tmp_path / "imgs"), "shard_size": 2, "store": str(tmp_path / "store")}
    run = run_dag("synsetforge_collect", conf)
    assert run.state == "success"
    cands = store.read_table("candidates").to_pandas()
    images = store.read_table("images").to_pandas()
    links = store.read_table("image_links").to_pandas()
    assert len(cands) == 16 and set(cands["wnid"]) == set(wnids)
    assert (images.status == "accepted").sum() == 15 and images.loc[images.status == "rejected", "reject_reason"].tolist() == ["not_an_image"]
    assert len(links) == 15 and store.list("ingest/parts/") == [] and store.list("collect/parts/") == []
    # Rerun: same tables, nothing duplicated.
    assert run_dag("synsetforge_collect", conf).state == "success"
    assert store.read_table("images").to_pandas().equals(images)  # the rerun fetched nothing: same rows, same times
    assert len(store.read_table("candidates")) == 16


def test_shard_plan_stays_under_the_map_limit_and_checks_wanted_wnids():
    from pipeline.errors import UserError
    from pipeline.sources.collect import plan_shards

    wnids = [f"n{i:08d}" for i in range(20_000)]
    shards = plan_shards(wnids, None, 5, 1000)
    assert len(shards) == 1000 < 1024  # the size was raised from 5 to 20
    assert [w for s in shards for w in s["wnids"]] == wnids and [s["shard"] for s in shards] == list(range(1000))
    assert plan_shards(wnids, ["n00000007", "n00000003"], 1, 1000) == [
        {"shard": 0, "wnids": ["n00000003"]}, {"shard": 1, "wnids": ["n00000007"]}]
    with pytest.raises(UserError, match="n99999999"):
        plan_shards(wnids, ["n99999999"], 1, 1000)


@pytest.mark.parametrize("point", ["collect.part_written", "ingest.part_written"])
def test_a_task_failing_halfway_is_retried_to_the_same_tables_as_a_clean_run(airflow_db, tmp_path, monkeypatch, point):
    """The failpoint raises right after a part of the task's output was written; the retry must neither lose nor
    duplicate a row: the end state equals a clean run's, table for table."""
    wnids = photo_folders(tmp_path / "imgs", 4, 5, seed=1)
    stores = {}
    for name in ("clean", "faulty"):
        stores[name] = open_store(tmp_path / name)
        stores[name].write_table("synsets", synsets_frame(wnids))
    monkeypatch.setenv("SYNSETFORGE__INGEST__FLUSH_EVERY", "2")
    conf = {"sources": ["local_dir"], "local_dir": str(tmp_path / "imgs"), "shard_size": 2}
    assert run_dag("synsetforge_collect", {**conf, "store": str(tmp_path / "clean")}).state == "success"

    (tmp_path / "faults").mkdir()
    monkeypatch.setenv("SYNSETFORGE_FAILPOINTS", f"{point}=raise")
    monkeypatch.setenv("SYNSETFORGE_FAILPOINT_DIR", str(tmp_path / "faults"))
    run = run_dag("synsetforge_collect", {**conf, "store": str(tmp_path / "faulty")})
    assert run.state == "success"
    assert [p.name for p in (tmp_path / "faults").iterdir()] == [f"{point}.0"], "the fault never fired"
    task = point.split(".")[0] + "_shard"
    tries = {(ti.task_id, ti.map_index): ti.try_number for ti in run.get_task_instances()}
    assert sorted(t for (tid, _), t in tries.items() if tid == task) == [1, 2], tries  # one shard failed once

    for table in ("candidates", "images", "image_links"):
        clean = stores["clean"].read_table(table).to_pandas().drop(columns=["found_at", "fetched_at"], errors="ignore")
        faulty = stores["faulty"].read_table(table).to_pandas().drop(columns=["found_at", "fetched_at"], errors="ignore")
        pd.testing.assert_frame_equal(clean, faulty, obj=table)
    assert len(stores["faulty"].read_table("images")) == 4 * 5
