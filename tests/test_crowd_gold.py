"""Gold controls built from the crowd's own results (crowd/gold.py): which pairs qualify as known positives and
negatives, the seed file, what QC does with them, the CLI; and on the real Label Studio, the crowd DAG refreshing
gold, pushing controls that simulated annotators answer, a yes-saying spammer flagged and blocked through its gold
record, and no control in the labels."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest

from crowd.gold import GoldRules, GoldSeedError, build_gold, empty_gold, refresh_gold, subtree_tops
from pipeline.config import load_settings
from pipeline.store import LocalStore

TENCH, GOLDFISH, DOG, TERRIER = "n01440764", "n01443537", "n02084071", "n02092468"
FISH, CANINE, MAMMAL, VERT = "n02512053", "n02083346", "n01861778", "n01471682"
EDGES = [(TENCH, FISH), (GOLDFISH, FISH), (FISH, VERT), (DOG, CANINE), (CANINE, MAMMAL), (MAMMAL, VERT),
         (TERRIER, DOG)]
HONEST = ["w-h1", "w-h2", "w-h3"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _synsets(wnids=(TENCH, GOLDFISH, DOG, TERRIER)):
    parents = dict(EDGES)
    return pd.DataFrame({"wnid": list(wnids), "name": [f"s{w}" for w in wnids], "lemmas": [[w] for w in wnids],
                         "gloss": "g", "depth": 5, "parent_wnids": [[parents[w]] for w in wnids],
                         "lexname": "noun.animal", "is_leaf": True, "queries": [[w] for w in wnids]})


def _edges():
    return pd.DataFrame({"child_wnid": [c for c, _ in EDGES], "parent_wnid": [p for _, p in EDGES],
                         "kind": "hypernym"})


def _world():
    """Labels, votes and links where exactly some pairs deserve to be controls (see the comments)."""
    lab, votes, links = [], [], []

    def pair(image, wnid, *, status="accepted", conf=0.9999, yes=HONEST, no=(), multi=False):
        lab.append({"image_id": image, "wnid": wnid, "status": status, "n_votes": len(yes) + len(no),
                    "n_yes": len(yes), "confidence": conf, "method": "test"})
        votes.extend({"image_id": image, "wnid": wnid, "worker": w, "answer": "yes"} for w in yes)
        votes.extend({"image_id": image, "wnid": wnid, "worker": w, "answer": "no"} for w in no)
        links.append({"image_id": image, "wnid": wnid, "url": f"http://example.org/{image}.jpg", "source": "test",
                      "rank": 1, "n_urls": 1, "n_synsets": 2 if multi else 1, "multi_synset": multi,
                      "near_duplicate_of": None})

    for i in range(1, 5):
        pair(f"t{i}", TENCH)
        pair(f"d{i}", DOG)
    for i in range(1, 4):
        pair(f"g{i}", GOLDFISH)
    pair("t5", TENCH, yes=["w-h1", "w-h2", "w-spam"])  # only two unflagged yes-voters
    pair("t6", TENCH, conf=0.995)  # accepted, but not confidently enough
    pair("t7", TENCH, no=["w-h4"])  # an unflagged worker disagrees
    pair("m1", TENCH, multi=True)  # linked to two synsets
    pair("m1", DOG, multi=True)
    pair("m2", DOG)
    pair("m2", TERRIER)  # accepted for two synsets (not multi_synset in the links)
    pair("r1", TENCH, status="rejected", conf=0.0001, yes=(), no=HONEST)
    images = sorted({r["image_id"] for r in lab})
    return pd.DataFrame(lab), pd.DataFrame(votes), pd.DataFrame(links), images


RULES = GoldRules(positives_per_wnid=2, negatives_per_wnid=3)


def _build(previous=None, seed=None, rules=RULES, **world):
    labels, votes, links, images = _world()
    args = dict(previous=previous if previous is not None else empty_gold(), seed=seed if seed is not None else empty_gold(),
                labels=labels, votes=votes, links=links, synsets=_synsets(), edges=_edges(), images=images,
                flagged={"w-spam"}, rules=rules)
    args.update(world)
    return build_gold(**args)


def test_subtrees_come_from_the_vocabulary_hierarchy():
    tops, anc = subtree_tops(_synsets(), _edges())
    assert tops[TENCH] == tops[GOLDFISH] == {FISH}
    assert tops[DOG] == tops[TERRIER] == {MAMMAL}
    assert DOG in anc[TERRIER] and VERT in anc[TENCH]


def test_positives_are_confident_unanimous_pairs_of_unflagged_workers():
    gold, stats = _build()
    pos = gold[gold["answer"] == "yes"]
    assert set(pos["source"]) == {"crowd"}
    assert pos.groupby("wnid").size().to_dict() == {TENCH: 2, GOLDFISH: 2, DOG: 2}  # TERRIER's only image: ambiguous
    assert set(pos.loc[pos["wnid"] == TENCH, "image_id"]) <= {"t1", "t2", "t3", "t4"}
    assert set(pos.loc[pos["wnid"] == DOG, "image_id"]) <= {"d1", "d2", "d3", "d4"}
    used = set(gold["image_id"])
    assert not used & {"t5", "t6", "t7", "m1", "m2", "r1"}  # flagged voter, low confidence, dissent, ambiguous
    assert stats["added"] == len(gold) and stats["dropped"] == 0


def test_negatives_come_from_another_subtree_never_an_ancestor_or_an_ambiguous_image():
    gold, _ = _build()
    neg = gold[gold["answer"] == "no"]
    assert neg.groupby("wnid").size().to_dict() == {TENCH: 3, GOLDFISH: 3, DOG: 3, TERRIER: 3}
    fish_images = {f"t{i}" for i in range(1, 5)} | {f"g{i}" for i in range(1, 4)}
    dog_images = {f"d{i}" for i in range(1, 5)}
    for wnid in (TENCH, GOLDFISH):
        assert set(neg.loc[neg["wnid"] == wnid, "image_id"]) <= dog_images
    for wnid in (DOG, TERRIER):  # a dog photo is never a known negative for a terrier (or the other way round)
        assert set(neg.loc[neg["wnid"] == wnid, "image_id"]) <= fish_images
    origin = neg["source"].str.partition(":")[2]
    assert (origin.isin([TENCH, GOLDFISH]) == neg["wnid"].isin([DOG, TERRIER])).all()


def test_one_subtree_gives_no_negatives_and_says_why():
    syn = _synsets((DOG, TERRIER))
    labels, votes, links, images = _world()
    gold, stats = build_gold(previous=empty_gold(), seed=empty_gold(), labels=labels, votes=votes, links=links,
                             synsets=syn, edges=_edges(), images=images, flagged={"w-spam"}, rules=GoldRules())
    assert (gold["answer"] == "yes").all() and len(gold)
    assert "one subtree" in stats["note"]


def test_controls_stay_once_chosen_quota_trims_and_the_share_limits_small_synsets():
    first, _ = _build()
    labels, votes, links, images = _world()
    pos = set(zip(first.loc[first.answer == "yes", "image_id"], first.loc[first.answer == "yes", "wnid"], strict=True))
    # QC has taken the positives out of the labels: they stay controls all the same
    rest = labels[[(i, w) not in pos for i, w in zip(labels["image_id"], labels["wnid"], strict=True)]]
    again, stats = _build(previous=first, labels=rest)
    assert again.equals(first) and (stats["added"], stats["dropped"]) == (0, 0)
    fewer, stats = _build(previous=first, labels=rest, rules=GoldRules(positives_per_wnid=1, negatives_per_wnid=3))
    assert fewer[fewer.answer == "yes"].groupby("wnid").size().max() == 1 and stats["dropped"] == 3
    # a synset gives at most max_positive_share of its accepted images: tench 8 x 0.3 -> 2, dog 6 x 0.3 -> 1,
    # goldfish 3 x 0.3 -> 0
    shared, _ = _build(rules=GoldRules(positives_per_wnid=5, negatives_per_wnid=0, max_positive_share=0.3))
    assert shared.groupby("wnid").size().to_dict() == {TENCH: 2, DOG: 1}


def test_seed_file_rows_win_mirror_the_file_and_bad_rows_are_refused(tmp_path):
    from crowd.gold import read_seed

    labels, votes, links, images = _world()
    imgs = pd.DataFrame({"image_id": images, "first_url": [f"http://first/{i}" for i in images]})
    seed_file = tmp_path / "seed.csv"
    pd.DataFrame({"url": ["http://example.org/t1.jpg", "http://first/d2", "http://nowhere/x.jpg"],
                  "wnid": [TENCH, TENCH, DOG], "answer": ["No", "no", "yes"]}).to_csv(seed_file, index=False)
    seed, unknown = read_seed(seed_file, imgs, links)
    assert unknown == 1 and sorted(seed["image_id"]) == ["d2", "t1"] and set(seed["answer"]) == {"no"}
    gold, stats = _build(seed=seed)
    row = gold.set_index(["image_id", "wnid"]).loc[("t1", TENCH)]
    assert (row["answer"], row["source"]) == ("no", "seed")  # the expert overrides the crowd
    assert stats["seed"] == 2
    without, stats = _build(previous=gold)  # the row left the file: it leaves the table
    assert not (without["source"] == "seed").any() and stats["dropped"] >= 2
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"image_id": ["t1"], "wnid": [TENCH], "answer": ["maybe"]}).to_csv(bad, index=False)
    with pytest.raises(GoldSeedError, match="answer other than yes/no"):
        read_seed(bad, imgs, links)
    with pytest.raises(GoldSeedError, match="needs wnid, answer"):
        pd.DataFrame({"image": ["t1"], "wnid": [TENCH]}).to_csv(bad, index=False)
        read_seed(bad, imgs, links)
    with pytest.raises(GoldSeedError, match="does not exist"):
        read_seed(tmp_path / "nope.csv", imgs, links)


# -- the I/O shell and QC on a store ---------------------------------------------------------------------------
def _blank_rows(table, n, **columns):
    from pipeline.schemas import arrow_schema

    rows = {}
    for f in arrow_schema(table):
        blank = "" if str(f.type) == "string" else (T0 if "timestamp" in str(f.type) else 0)
        rows[f.name] = [None if f.nullable else blank] * n
    rows.update(columns)
    return pd.DataFrame(rows)


def _qc_store(tmp_path, n_per_wnid=6):
    """A store with honest votes (five workers, always right) on fish and dog candidates, and their links."""
    store = LocalStore(tmp_path / "store")
    store.write_table("synsets", _synsets((TENCH, DOG)))
    store.write_table("synset_edges", _edges())
    truth, votes, aid = {}, [], 0
    for wnid in (TENCH, DOG):
        for i in range(n_per_wnid):
            truth[(f"{wnid}-{i:02d}", wnid)] = "no" if i == 0 else "yes"
    ids = sorted({i for i, _ in truth})
    store.write_table("images", _blank_rows("images", len(ids), image_id=ids, storage_key=[f"blobs/{i}" for i in ids],
                                            first_url=[f"http://x/{i}" for i in ids], status="accepted"))
    store.write_table("image_links", _blank_rows("image_links", len(truth), image_id=[i for i, _ in truth],
                                                 wnid=[w for _, w in truth], url=[f"http://x/{i}" for i, _ in truth],
                                                 source="test", rank=1, n_urls=1, n_synsets=1, multi_synset=False))
    for (image, wnid), answer in truth.items():
        for w in range(5):
            aid += 1
            votes.append({"annotation_id": aid, "task_id": aid, "image_id": image, "wnid": wnid, "worker": f"w-{w}",
                          "answer": answer, "is_gold": False, "lead_time_s": 1.0, "submitted_at": T0})
    store.write_table("votes", pd.DataFrame(votes))
    settings = load_settings(env={}, overrides={"store": {"url": str(store.root)}, "crowd": {
        "gold_min_confidence": 0.99, "gold_positives_per_wnid": 2, "gold_negatives_per_wnid": 2,
        "gold_max_positive_share": 0.5}})
    return store, settings, truth


def test_refresh_then_qc_leaves_every_control_out_of_labels_and_plan(tmp_path):
    from pipeline.qc.stage import run_qc

    store, settings, truth = _qc_store(tmp_path)
    assert refresh_gold(store, settings)["gold"] == 0  # no labels yet: no gold, and an empty table says so
    assert store.has_table("gold") and len(store.read_table("gold")) == 0
    first = run_qc(store, settings)
    assert first["accepted"] == 10 and first["rejected"] == 2
    out = refresh_gold(store, settings)
    gold = store.read_table("gold").to_pandas()
    assert (out["positives"], out["negatives"]) == (4, 4) and out["written"]
    assert set(gold.loc[gold.answer == "no", "wnid"]) == {TENCH, DOG}
    links = store.read_table("image_links").to_pandas()
    both = set(zip(gold["image_id"], gold["wnid"], strict=True)) & set(zip(links["image_id"], links["wnid"], strict=True))
    assert len(both) == 4  # the known positives are candidates too
    second = run_qc(store, settings)
    labels = store.read_table("labels").to_pandas()
    plan = store.read_table("push_plan").to_pandas()
    in_labels = set(zip(labels["image_id"], labels["wnid"], strict=True))
    assert not in_labels & set(zip(gold["image_id"], gold["wnid"], strict=True))
    assert not set(zip(plan["image_id"], plan["wnid"], strict=True)) & both
    assert second["accepted"] == 6 and len(labels) == 8  # every other pair is still decided
    again = refresh_gold(store, settings)  # positives no longer in labels: kept all the same, nothing rewritten
    assert (again["added"], again["dropped"], again["written"]) == (0, 0, False)
    assert refresh_gold(store, settings, grow=False)["frozen"]


def test_a_pair_pushed_as_a_gold_task_stays_out_of_labels_even_when_it_is_a_candidate(tmp_path):
    """QC's own rule (tasks.is_gold), for a candidate pair that is also a control, with no gold table at all."""
    from pipeline.qc.stage import run_qc

    store, settings, truth = _qc_store(tmp_path)
    image, wnid = f"{TENCH}-03", TENCH
    store.write_table("tasks", _blank_rows("tasks", 1, task_id=[99], project_id=1, request_id=["r"], image_id=[image],
                                           wnid=[wnid], kind="verify", is_gold=True, gold_answer="yes", pushed_at=T0))
    run_qc(store, settings)
    labels = store.read_table("labels").to_pandas()
    assert (image, wnid) not in set(zip(labels["image_id"], labels["wnid"], strict=True)) and len(labels) == 11


def test_push_without_gold_plans_no_controls():
    from crowd.kinds import REQUEST_COLUMNS
    from crowd.push import plan_requests

    plan = pd.DataFrame({"image_id": ["a", "b"], "wnid": TENCH, "n_more": 2})
    for gold in (None, empty_gold()):
        reqs = plan_requests(plan, kind="verify", project_id=1, history=pd.DataFrame(columns=REQUEST_COLUMNS),
                             open_request_ids=set(), gold=gold, gold_rate=0.5)
        assert len(reqs) == 2 and not reqs["is_gold"].any()


def test_cli_gold_refresh_and_show(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main
    from pipeline.qc.stage import run_qc

    store, settings, _ = _qc_store(tmp_path)
    run_qc(store, settings)
    env = ["--store", str(store.root)]
    assert main([*env, "crowd", "gold"]) == 0
    assert "no gold controls yet" in capsys.readouterr().out
    monkeypatch.setenv("SYNSETFORGE__CROWD__GOLD_MIN_CONFIDENCE", "0.99")
    assert main([*env, "crowd", "gold", "--refresh"]) == 0  # default share 0.1 of 5 accepted images: no positive
    out = capsys.readouterr().out
    assert "0 known positive(s) and 10 known negative(s)" in out and "10 added" in out
    row = next(line for line in out.splitlines() if TENCH in line)
    assert [c.strip() for c in row.strip("|").split("|")][:3] == [TENCH, "0", "5"]
    seed = tmp_path / "seed.csv"
    seed.write_text("image_id,wnid,answer\nsome-image,n123,yes\n")
    monkeypatch.setenv("SYNSETFORGE__CROWD__GOLD_SEED_FILE", str(seed))
    assert main([*env, "crowd", "gold", "--refresh"]) == 2
    assert "n + 8 digits" in capsys.readouterr().err


# -- the real loop ---------------------------------------------------------------------------------------------
def _links(ids, wnids):
    return pd.DataFrame({"image_id": ids, "wnid": wnids, "url": [f"http://example.org/{i}.jpg" for i in ids],
                         "source": "test", "rank": range(1, len(ids) + 1), "n_urls": 1, "n_synsets": 1,
                         "multi_synset": False, "near_duplicate_of": None})


@pytest.mark.slow
def test_crowd_dag_builds_gold_pushes_it_flags_and_blocks_a_spammer_and_keeps_controls_out_of_labels(
        labelstudio, airflow_db, monkeypatch):
    """Two batches of candidates through the crowd DAG (dag.test()) with three careful annotators and a yes-sayer:
    the first batch is judged without gold; when the second arrives, refresh_gold makes known positives and
    cross-subtree negatives of the first batch's confident labels, push mixes every control in, the annotators
    answer them, the yes-sayer's gold record flags it and block_workers deactivates its account, and no control
    is in the labels at the end."""
    from conftest import run_dag
    from fixtures_labelstudio import make_images, write_synsets

    from crowd.provision import find_project, kind_project_ids
    from crowd.pull import pseudonym
    from crowd.simulate import Blocked, Profile, controls_of, next_task, work

    ls = labelstudio
    if not ls.server.password:
        pytest.skip("external server: its admin password is not known to the tests")
    store = ls.new_store()
    images = make_images(store, 24, seed=2468)
    write_synsets(store)
    store.write_table("synset_edges", _edges())  # tench under fish, dog under mammal: two subtrees
    ids = images["image_id"].tolist()
    wnids = [TENCH if k % 2 else DOG for k in range(24)]
    truth = {(i, w): ("no" if k % 6 in (0, 1) else "yes") for k, (i, w) in enumerate(zip(ids, wnids, strict=True))}
    store.write_table("image_links", _links(ids[:12], wnids[:12]))
    env = {"CROWD__TOKEN": ls.token, "CROWD__PSEUDONYM_KEY": "k", "CROWD__ADMIN_PASSWORD": ls.server.password,
           "QC__INITIAL_VOTES": "4", "CROWD__GOLD_MIN_CONFIDENCE": "0.99", "CROWD__GOLD_POSITIVES_PER_WNID": "2",
           "CROWD__GOLD_NEGATIVES_PER_WNID": "3", "CROWD__GOLD_MAX_POSITIVE_SHARE": "0.5", "CROWD__GOLD_MIN_N": "4"}
    for k, v in env.items():
        monkeypatch.setenv(f"SYNSETFORGE__{k}", v)
    prefix = ls.settings(store).crowd.project_prefix
    conf = {"store": str(store.root), "url": ls.url, "project_prefix": prefix, "files_root": str(ls.files_root),
            "gold_rate": 0.5, "auto_block": True}
    careful = ls.annotators([Profile(accuracy=1.0)] * 3)
    [yes_sayer] = ls.annotators([Profile(yes_bias=1.0)])
    people = [*careful, yes_sayer]
    w_yes = pseudonym(yes_sayer.email, b"k")

    def loop(max_rounds=5):
        states = []
        for rnd in range(max_rounds):
            run = run_dag("synsetforge_crowd", conf)
            states.append({ti.task_id: str(ti.state) for ti in run.get_task_instances()})
            assert run.state == "success", states[-1]
            if states[-1]["settled"] == "success":
                return states
            for pid in kind_project_ids(ls.admin(), ls.settings(store, project_prefix=prefix), "verify", store):
                work(people, pid, truth, seed=rnd, controls=controls_of(store))  # a project per overlap asked
        raise AssertionError(f"not settled after {max_rounds} rounds: {states}")

    first = loop()
    assert store.has_table("gold") and len(store.read_table("gold")) == 0  # nothing confident yet: no controls
    assert not store.read_table("tasks").to_pandas()["is_gold"].any()

    store.write_table("image_links", _links(ids, wnids))  # the second batch arrives
    second = loop()
    assert all(s["refresh_gold"] == "success" and s["block_workers"] == "success" for s in first + second)

    gold = store.read_table("gold").to_pandas()
    batch1 = set(ids[:12])
    assert set(gold["image_id"]) <= batch1  # made of the first batch's confident labels
    assert gold.groupby(["wnid", "answer"]).size().to_dict() == {(DOG, "no"): 3, (DOG, "yes"): 2,
                                                                 (TENCH, "no"): 3, (TENCH, "yes"): 2}
    assert all(truth[(i, w)] == a for i, w, a in zip(gold["image_id"], gold["wnid"], gold["answer"], strict=True)
               if (i, w) in truth)
    origin = dict(zip(ids, wnids, strict=True))
    neg = gold[gold["answer"] == "no"]
    assert all(origin[i] != w and s == f"crowd:{origin[i]}" for i, w, s in zip(neg["image_id"], neg["wnid"],
                                                                              neg["source"], strict=True))
    # every control was pushed as a gold task and answered by all four
    tasks = store.read_table("tasks").to_pandas()
    votes = store.read_table("votes").to_pandas()
    gt = tasks[tasks["is_gold"]]
    assert set(zip(gt["image_id"], gt["wnid"], strict=True)) == set(zip(gold["image_id"], gold["wnid"], strict=True))
    gv = votes[votes["is_gold"]]
    assert len(gv) == 4 * len(gt) and gv["worker"].nunique() == 4
    # the yes-sayer fails the known negatives: flagged by its gold record, and blocked
    wg = store.read_table("worker_gold").to_pandas().set_index("worker")
    assert bool(wg.loc[w_yes, "flagged"]) and wg.loc[w_yes, "gold_n"] == 10 and wg.loc[w_yes, "gold_accuracy"] == 0.4
    assert not wg.drop(index=w_yes)["flagged"].any() and (wg.drop(index=w_yes)["gold_accuracy"] == 1.0).all()
    pid = find_project(ls.admin(), f"{prefix} verify")["id"]
    with pytest.raises(Blocked):
        next_task(yes_sayer.client, pid)
    assert ls.admin().blocked_user_ids(password=ls.server.password) & {a.user_id for a in people} == {yes_sayer.user_id}
    # controls never reach the labels, though the known positives are candidates too
    labels = store.read_table("labels").to_pandas()
    held = set(zip(gold["image_id"], gold["wnid"], strict=True))
    links = set(zip(ids, wnids, strict=True))
    assert len(held & links) == 4
    in_labels = set(zip(labels["image_id"], labels["wnid"], strict=True))
    assert not in_labels & held and in_labels == links - held
    assert {(r.image_id, r.wnid): ("yes" if r.status == "accepted" else "no") for r in labels.itertuples()} == \
        {p: truth[p] for p in links - held}
    ls.admin().unblock_user(yes_sayer.user_id, password=ls.server.password)
