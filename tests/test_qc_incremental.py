"""QC rounds on the store: incremental rounds agree with a full refit, a round with nothing new writes nothing,
a round that dies half-way is repaired by the next one, a full refit streams its votes in batches; and the two
store operations the rounds stand on (read_changes, replace_rows)."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_settings
from pipeline.qc import stage
from pipeline.qc.stage import run_qc
from pipeline.store import LocalStore

N_WORKERS = 100
QC_TABLES = ("labels", "push_plan", "workers", "qc_pairs", "qc_workers", "qc_synsets")
KEY = {"labels": ["wnid", "image_id"], "push_plan": ["wnid", "image_id"], "qc_pairs": ["wnid", "image_id"],
       "workers": ["worker"], "qc_workers": ["code"], "qc_synsets": ["wnid"]}


class Crowd:
    """A seeded crowd loop on a store: synsets of images (image_links), workers with accuracy ~ Beta(8, 2) and a
    share of spammers answering at random; `answer(plan)` gives each planned pair its n_more votes from distinct
    random workers and appends them to `votes`, as a pull would."""

    def __init__(self, store: LocalStore, seed: int, n_workers: int = 400, spam: float = 0.1):
        self.store, self.rng = store, np.random.default_rng(seed)
        self.seed = seed
        self.acc = self.rng.beta(8, 2, n_workers)
        self.spammer = self.rng.random(n_workers) < spam
        self.pairs = pd.DataFrame({"wnid": pd.Series(dtype=object), "image_id": pd.Series(dtype=object)})
        self.truth: dict[tuple[str, str], bool] = {}
        self.voted: dict[tuple[str, str], set[int]] = {}
        self.aid = 0
        self.t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def add_images(self, wnid: str, n: int) -> pd.DataFrame:
        start = int((self.pairs["wnid"] == wnid).sum())
        new = pd.DataFrame({"wnid": wnid, "image_id": [hashlib.sha256(f"{self.seed}/{wnid}/{i}".encode()).hexdigest()
                                                       for i in range(start, start + n)]})
        for r in new.itertuples(index=False):
            self.truth[(r.wnid, r.image_id)] = bool(self.rng.random() < 0.5)
        self.pairs = pd.concat([self.pairs, new], ignore_index=True)
        p = self.pairs
        self.store.write_table("image_links", pd.DataFrame({
            "image_id": p["image_id"], "wnid": p["wnid"], "url": "u", "source": "local_dir", "rank": 0, "n_urls": 1,
            "n_synsets": 1, "multi_synset": False, "near_duplicate_of": None}))
        return new

    def answer(self, plan: pd.DataFrame) -> int:
        rows = []
        n_workers = len(self.acc)
        for r in plan.itertuples(index=False):
            key = (r.wnid, r.image_id)
            seen = self.voted.setdefault(key, set())
            for _ in range(int(r.n_more)):
                w = next(int(w) for w in self.rng.permutation(n_workers) if int(w) not in seen)
                seen.add(w)
                right = self.rng.random() < (0.5 if self.spammer[w] else self.acc[w])
                yes = self.truth[key] if right else not self.truth[key]
                self.aid += 1
                rows.append({"annotation_id": self.aid, "task_id": self.aid, "image_id": r.image_id, "wnid": r.wnid,
                             "worker": f"w-{w:04d}", "answer": "yes" if yes else "no", "is_gold": False,
                             "lead_time_s": 1.0, "submitted_at": self.t0 + timedelta(seconds=self.aid)})
        if rows:
            self.store.append_table("votes", pd.DataFrame(rows), unique_by=["annotation_id", "image_id"])
        return len(rows)

    def plan(self) -> pd.DataFrame:
        plan = self.store.read_table("push_plan").to_pandas()
        return plan[plan["n_more"] > 0]


def wnid(i: int) -> str:
    return f"n{10_000_000 + 7 * i:08d}"


def tables(store: LocalStore) -> dict[str, pd.DataFrame]:
    return {n: store.read_table(n).to_pandas().sort_values(KEY[n], kind="stable").reset_index(drop=True)
            for n in QC_TABLES}


def assert_same_tables(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for name in QC_TABLES:
        left, right = a[name], b[name]
        if name == "qc_synsets":  # the round that decided a synset is bookkeeping, not content
            left, right = left.drop(columns="round"), right.drop(columns="round")
        pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=1e-9, atol=1e-12, obj=name)


def grown_world(tmp_path, seed: int, n_done: int = 50, n_images: int = 60, votes_each: int = 10
                ) -> tuple[LocalStore, Crowd, object]:
    """`n_done` synsets whose images all have `votes_each` votes (an ImageNet-like bulk of decided synsets), QC run
    over them once."""
    store = LocalStore(tmp_path / "s")
    crowd = Crowd(store, seed, n_workers=N_WORKERS)
    for i in range(n_done):
        new = crowd.add_images(wnid(i), n_images)
        crowd.answer(new.assign(n_more=votes_each))
    settings = load_settings(env={})
    assert run_qc(store, settings)["qc_round"]["mode"] == "full"
    return store, crowd, settings


def full_refit_of(store: LocalStore, tmp_path, settings) -> LocalStore:
    copy = tmp_path / "full"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store.root, copy)
    refit = LocalStore(copy)
    assert run_qc(refit, settings, full=True)["qc_round"]["mode"] == "full"
    return refit


# ----- incremental rounds against a full refit ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_rounds_agree_with_a_full_refit(tmp_path, seed):
    """Twelve crowd-loop rounds: each round two synsets get new images (ingest) and the crowd answers the whole push
    plan; QC re-decides only the synsets that changed. A full refit of the same votes gives the same status for
    >= 99.9 % of pairs, and every pair that differs has a posterior within 0.01 of a threshold."""
    store, crowd, settings = grown_world(tmp_path, seed)
    qc = settings.qc
    rng = np.random.default_rng(100 + seed)
    redecided = []
    for r in range(12):
        for i in rng.choice(50 + r, 2, replace=False):
            crowd.add_images(wnid(int(i)), 15)
        crowd.answer(crowd.plan())
        s = run_qc(store, settings, refit_growth=None)
        assert s["qc_round"]["mode"] == "incremental", s["qc_round"]
        redecided.append(s["qc_round"]["synsets"])
    assert sorted(redecided)[6] < 20, redecided  # once the backlog is answered, a round re-decides a few synsets
    inc = store.read_table("labels").to_pandas()
    full = full_refit_of(store, tmp_path, settings).read_table("labels").to_pandas()
    m = inc.merge(full, on=["wnid", "image_id"], how="outer", suffixes=("_inc", "_full"), indicator=True)
    assert (m["_merge"] == "both").all() and len(m) == len(crowd.pairs) > 3000
    differ = m[m["status_inc"] != m["status_full"]]
    assert len(differ) <= 0.001 * len(m), differ
    gap = np.minimum(abs(differ["confidence_full"] - qc.accept_at), abs(differ["confidence_full"] - qc.reject_at))
    assert (gap <= 0.01).all(), differ
    assert (m["status_inc"] != "pending").mean() > 0.8  # the crowd did decide most pairs


def test_a_round_re_decides_only_the_pairs_that_changed(tmp_path):
    """New votes on a few pairs of big synsets: the round re-decides those pairs and the watched ones, not whole
    synsets; every other pair keeps its labels row as it was, and the result agrees with a full refit."""
    store, crowd, settings = grown_world(tmp_path, 5, n_done=12, n_images=80)
    before = store.read_table("labels").to_pandas()
    rng = np.random.default_rng(7)
    hit = before.iloc[rng.choice(len(before), 24, replace=False)][["image_id", "wnid"]]
    assert crowd.answer(hit.assign(n_more=1)) == 24
    s = run_qc(store, settings, refit_growth=None)
    r = s["qc_round"]
    assert r["mode"] == "incremental"
    in_round = before[before["wnid"].isin(set(hit["wnid"]))]
    assert 24 <= r["pairs"] < len(in_round) / 2, (r, len(in_round))
    after = store.read_table("labels").to_pandas()
    key = ["wnid", "image_id"]
    m = before.merge(after, on=key, suffixes=("_b", "_a"))
    assert len(m) == len(before) == len(after)
    changed = m[(m["n_votes_b"] != m["n_votes_a"]) | (m["confidence_b"] != m["confidence_a"])]
    assert set(map(tuple, hit[key].to_numpy())) <= set(map(tuple, changed[key].to_numpy()))
    assert len(changed) <= r["pairs"]  # nothing outside the re-decided pairs moved
    full = full_refit_of(store, tmp_path, settings).read_table("labels").to_pandas()
    both = after.merge(full, on=key, suffixes=("_inc", "_full"))
    differ = both[both["status_inc"] != both["status_full"]]
    gap = np.minimum(abs(differ["confidence_full"] - settings.qc.accept_at),
                     abs(differ["confidence_full"] - settings.qc.reject_at))
    assert len(differ) <= 0.001 * len(both) and (gap <= 0.01).all(), differ


def test_a_round_with_no_new_votes_changes_nothing(tmp_path):
    store, crowd, settings = grown_world(tmp_path, 3, n_done=8, n_images=20)
    crowd.add_images(wnid(0), 10)
    crowd.answer(crowd.plan())
    assert run_qc(store, settings)["qc_round"]["mode"] == "incremental"
    before = {n: store.table_version(n) for n in (*QC_TABLES, "qc_rounds")}
    kept = tables(store)
    s = run_qc(store, settings)
    assert s["qc_round"]["mode"] == "unchanged" and s["qc_round"]["reason"] == "no new input"
    assert {n: store.table_version(n) for n in before} == before  # not one commit
    assert_same_tables(tables(store), kept)
    assert s["pairs"] == len(kept["labels"]) and s["push_pairs"] == int((kept["push_plan"]["n_more"] > 0).sum())


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("mode,after", [("incremental", "labels"), ("incremental", "qc_pairs"),
                                        ("incremental", "workers"), ("full", "push_plan")])
def test_a_round_that_dies_half_way_is_redone_by_the_next(tmp_path, monkeypatch, mode, after):
    """The round raises after writing `after`; the next round (with no new input) leaves the same tables as a round
    that never failed."""
    store, crowd, settings = grown_world(tmp_path, 4, n_done=10, n_images=20)
    crowd.add_images(wnid(1), 10)
    crowd.answer(crowd.plan())
    clean = tmp_path / "clean"
    shutil.copytree(store.root, clean)
    ok = LocalStore(clean)
    expected_mode = run_qc(ok, settings, full=mode == "full")["qc_round"]["mode"]
    assert expected_mode == mode

    real_replace, real_write = LocalStore.replace_rows, LocalStore.write_table

    def replace(self, name, *a, **kw):
        out = real_replace(self, name, *a, **kw)
        if name == after:
            raise Boom(name)
        return out

    def write(self, name, *a, **kw):
        out = real_write(self, name, *a, **kw)
        if name == after:
            raise Boom(name)
        return out

    monkeypatch.setattr(LocalStore, "replace_rows", replace)
    monkeypatch.setattr(LocalStore, "write_table", write)
    with pytest.raises(Boom):
        run_qc(store, settings, full=mode == "full")
    monkeypatch.undo()
    s = run_qc(store, settings)  # the crowd loop's next round: not asked for a full refit
    assert s["qc_round"]["mode"] == mode and "did not finish" in s["qc_round"]["reason"]
    assert_same_tables(tables(store), tables(ok))
    assert run_qc(store, settings)["qc_round"]["mode"] == "unchanged"


# ----- what makes a round full or incremental ---------------------------------------------------------------
def test_incremental_round_reads_only_the_synsets_with_new_votes(tmp_path, monkeypatch):
    store, crowd, settings = grown_world(tmp_path, 5, n_done=12, n_images=20)
    crowd.answer(pd.DataFrame({"wnid": wnid(3), "image_id": crowd.pairs.loc[crowd.pairs["wnid"] == wnid(3), "image_id"],
                               "n_more": 1}))
    reads = []
    real = LocalStore.read_table

    def spy(self, name, *a, **kw):
        if name == "votes":
            reads.append(kw.get("filter"))
        return real(self, name, *a, **kw)

    monkeypatch.setattr(LocalStore, "read_table", spy)
    s = run_qc(store, settings, refit_growth=None)
    monkeypatch.undo()
    rounds = store.read_table("qc_rounds").to_pandas()
    redecided = list(rounds.iloc[-1]["synsets"])
    assert s["qc_round"]["mode"] == "incremental" and wnid(3) in redecided and len(redecided) <= 2  # + a watched one
    assert reads and all(f[0][:2] == ("wnid", "in") and set(f[0][2]) <= set(redecided) for f in reads)  # never all


def test_settings_change_or_foreign_writes_or_growth_force_a_full_refit(tmp_path):
    store, crowd, settings = grown_world(tmp_path, 6, n_done=6, n_images=20)
    crowd.add_images(wnid(0), 5)
    crowd.answer(crowd.plan())
    other = load_settings(env={}, overrides={"qc": {"accept_at": 0.98}})
    s = run_qc(store, other)
    assert s["qc_round"]["mode"] == "full" and "settings" in s["qc_round"]["reason"]
    assert set(store.read_table("labels").to_pandas()["method"]) == {"adaptive-ds"}
    labels = store.read_table("labels").to_pandas()
    store.write_table("labels", labels.head(3))  # someone else writes QC's table
    s = run_qc(store, other)
    assert s["qc_round"]["mode"] == "full" and "outside a QC round" in s["qc_round"]["reason"]
    assert store.read_table("labels").num_rows == len(labels)
    crowd.answer(crowd.pairs.assign(n_more=4))  # about +40 % votes
    s = run_qc(store, other)
    assert s["qc_round"]["mode"] == "full" and "votes grew" in s["qc_round"]["reason"]


def test_full_refit_in_batches_equals_one_batch_and_aggregate(tmp_path, monkeypatch):
    """A full refit streams the votes synset batch by synset batch into chunks on disk; batches of a few synsets
    give the tables one batch gives, and the pure `aggregate` decides the same."""
    store, crowd, settings = grown_world(tmp_path, 7, n_done=12, n_images=25, votes_each=5)
    one = tables(store)
    monkeypatch.setattr(stage, "BATCH_VOTES", 300)
    s = run_qc(store, settings, full=True)
    assert s["qc_round"]["batches"] >= 5
    assert_same_tables(tables(store), one)
    votes = store.read_table("votes").to_pandas()
    links = store.read_table("image_links").to_pandas()
    labels, workers, plan, _ = stage.aggregate(votes, pd.DataFrame(), stage.pairs_to_verify(links), settings.qc)
    pd.testing.assert_frame_equal(labels.sort_values(["wnid", "image_id"]).reset_index(drop=True), one["labels"],
                                  check_exact=False, rtol=1e-9)
    pd.testing.assert_frame_equal(workers, one["workers"], check_exact=False, rtol=1e-9)


def test_cli_full_flag_refits(tmp_path, capsys):
    from pipeline.cli import main

    store, crowd, settings = grown_world(tmp_path, 8, n_done=4, n_images=10)
    assert main(["--store", str(store.root), "qc", "--json"]) == 0
    assert '"mode": "unchanged"' in capsys.readouterr().out
    assert main(["--store", str(store.root), "qc", "--full"]) == 0
    out = capsys.readouterr().out
    assert "full refit" in out and "asked (--full)" in out


# ----- the store operations -------------------------------------------------------------------------------
def label_rows(wnids: list[str], n: int, status: str = "pending") -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"{i:064x}" for w in wnids for i in range(n)],
                         "wnid": [w for w in wnids for _ in range(n)], "status": status, "n_votes": 1, "n_yes": 0,
                         "confidence": 0.5, "method": "x"})


def test_replace_rows_rewrites_only_the_files_holding_those_values(tmp_path):
    store = LocalStore(tmp_path / "s")
    ws = [wnid(i) for i in range(40)]
    store.replace_rows("labels", label_rows(ws, 100), column="wnid", values=None, rows_per_file=500)
    files = {a["path"] for a in _adds(store, "labels")}
    assert len(files) == 8  # 500 rows a file, cut where the synset changes
    v = store.replace_rows("labels", label_rows(ws[7:9], 3, "accepted"), column="wnid", values=[ws[7], ws[8], "n99"],
                           rows_per_file=500)
    entry = store._log_entry("labels", v)
    removed = [a["remove"]["path"] for a in entry if "remove" in a]
    assert len(removed) == 1 and removed[0] in files  # synsets 7 and 8 share one file: only it is rewritten
    got = store.read_table("labels").to_pandas()
    assert len(got) == 40 * 100 - 2 * 100 + 2 * 3
    assert got.groupby("wnid").size()[ws[7]] == 3 and set(got.loc[got["wnid"] == ws[7], "status"]) == {"accepted"}
    assert got.groupby("wnid").size()[ws[6]] == 100 and got.groupby("wnid").size()[ws[9]] == 100
    with pytest.raises(Exception, match="outside the ones replaced"):
        store.replace_rows("labels", label_rows([ws[1]], 1), column="wnid", values=[ws[2]])


def _adds(store: LocalStore, name: str) -> list[dict]:
    v = store.table_version(name)
    live: dict[str, dict] = {}
    for i in range(v + 1):
        for a in store._log_entry(name, i):
            if "add" in a:
                live[a["add"]["path"]] = a["add"]
            if "remove" in a:
                live.pop(a["remove"]["path"], None)
    return list(live.values())


def test_read_changes_returns_appended_rows_and_none_after_a_rewrite(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.append_table("labels", label_rows([wnid(1)], 5))
    v0 = store.table_version("labels")
    assert store.read_changes("labels", -1).num_rows == 5
    assert store.read_changes("labels", v0).num_rows == 0
    store.append_table("labels", label_rows([wnid(2)], 3))
    store.append_table("labels", label_rows([wnid(3)], 2))
    got = store.read_changes("labels", v0, columns=["wnid"]).to_pandas()
    assert got["wnid"].tolist() == [wnid(2)] * 3 + [wnid(3)] * 2
    store.compact("labels")  # a data-neutral commit: the appended rows are still the change
    assert store.read_changes("labels", v0).num_rows == 5
    store.write_table("labels", label_rows([wnid(4)], 1))
    assert store.read_changes("labels", v0) is None  # rows were replaced: read the table whole


def test_an_edited_answer_is_a_new_row_the_round_takes_as_the_latest(tmp_path):
    """The votes table gets a second row for an annotation whose answer was edited (same annotation id and image,
    later submitted_at): an incremental round counts the edit, not both rows, and agrees with a full refit."""
    store, crowd, settings = grown_world(tmp_path, 9, n_done=6, n_images=20)
    votes = store.read_table("votes").to_pandas()
    first = votes.iloc[0]
    pair = votes[(votes["wnid"] == first["wnid"]) & (votes["image_id"] == first["image_id"])]
    edits = pair.assign(answer=np.where(pair["answer"] == "yes", "no", "yes"),
                        submitted_at=pair["submitted_at"] + pd.Timedelta(days=1))
    store.append_table("votes", edits, unique_by=["annotation_id", "image_id", "submitted_at"])
    s = run_qc(store, settings, refit_growth=None)
    assert s["qc_round"]["mode"] == "incremental"
    row = store.read_table("labels", filter=[("image_id", "=", first["image_id"])]).to_pandas().iloc[0]
    assert row["n_votes"] == len(pair) and row["n_yes"] == int((edits["answer"] == "yes").sum())
    a, b = tables(store)["labels"], tables(full_refit_of(store, tmp_path, settings))["labels"]
    assert (a["status"] == b["status"]).all() and (a["n_yes"] == b["n_yes"]).all()


def test_block_with_earlier_rows_equals_coding_them_apart():
    """`Block.with_earlier` codes the votes once; its earlier block must equal `from_votes` on those rows alone,
    with repeats, edits (same annotation and image, later time) and a worker voting twice on one pair."""
    import pyarrow as pa

    from pipeline.qc.votes import Block, WorkerCodes

    rng = np.random.default_rng(3)
    n = 400
    aid = rng.integers(0, 150, n)
    t = pa.table({"annotation_id": aid, "image_id": [f"i{k % 40:03d}" for k in aid],
                  "wnid": [f"n{k % 3:08d}" for k in aid], "worker": [f"w{k}" for k in rng.integers(0, 12, n)],
                  "answer": rng.choice(["yes", "no", " Yes"], n),
                  "submitted_at": pa.array(rng.integers(0, 10**9, n), pa.timestamp("us", tz="UTC"))})
    extra = pd.DataFrame({"wnid": ["n00000009", "n00000001"], "image_id": ["zz", "i001"]})
    for earlier in (rng.random(n) < 0.7, np.zeros(n, dtype=bool), np.ones(n, dtype=bool)):
        codes = WorkerCodes([])
        block, old = Block.with_earlier(t, codes, extra, earlier)
        ref = Block.from_votes(t, codes, extra)
        ref_old = Block.from_votes(t, codes, ref.pairs, keep_rows=earlier)
        assert block.pairs.equals(ref.pairs)
        union = pd.concat([t.select(["wnid", "image_id"]).to_pandas(), extra]).drop_duplicates()
        assert block.pairs.values.tolist() == union.sort_values(["wnid", "image_id"]).values.tolist()
        assert (block.pairs.iloc[block.task]["image_id"].to_numpy() ==
                np.array([f"i{k % 40:03d}" for k in block.annotation_id])).all()
        assert old.pairs.astype(str).values.tolist() == ref_old.pairs.astype(str).values.tolist()
        for a, b in ((block, ref), (old, ref_old)):
            for col in ("task", "worker", "label", "annotation_id", "submitted_at"):
                assert np.array_equal(getattr(a, col), getattr(b, col)), col
        assert len(old.task) == len(ref_old.task) and (len(old.task) > 0) == bool(earlier.any())


# ----- the maintenance DAG -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_maintenance_dag_compacts_refits_and_vacuums(airflow_db, tmp_path):
    """dag.test() of synsetforge_maintenance on a store after incremental rounds: votes end in fewer files with no
    row lost, the refit is a full round whose labels equal `qc --full` on a copy, and the run succeeds."""
    from conftest import run_dag

    store, crowd, settings = grown_world(tmp_path, 4, n_done=6, n_images=20)
    for _ in range(3):
        crowd.add_images(wnid(0), 5)
        crowd.answer(crowd.plan())
        assert run_qc(store, settings, refit_growth=None)["qc_round"]["mode"] == "incremental"
    votes_before = store.read_table("votes").to_pandas().sort_values("annotation_id").reset_index(drop=True)
    from deltalake import DeltaTable

    def live_files() -> int:
        return len(DeltaTable(str(store.root / "tables" / "votes")).file_uris())
    files_before = live_files()
    expected = tables(full_refit_of(store, tmp_path, settings))
    run = run_dag("synsetforge_maintenance", {"store": str(store.root), "retention_days": 30})
    assert run.state == "success", run.state
    votes_after = store.read_table("votes").to_pandas().sort_values("annotation_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(votes_before, votes_after, check_like=True)
    assert files_before > 1 and live_files() < files_before
    rounds = store.read_table("qc_rounds").to_pandas()
    assert rounds.iloc[-1]["mode"] == "full" and rounds.iloc[-1]["state"] == "done"
    pd.testing.assert_frame_equal(tables(store)["labels"], expected["labels"], check_exact=False, rtol=1e-9)
