"""QC methods: defined behaviour on edge cases, spammer detection, the stopping rule on a seeded crowd."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.qc import AdaptiveConsensus, ConfidenceTable, DawidSkene, GoldFilter, MajorityVote, QCInputError
from pipeline.qc.workers import FlagRules


def crowd(n_tasks: int, accs: list[float], seed: int = 0, per_task: int | None = None,
          kinds: dict[int, str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Long frame: every worker (or `per_task` random ones) answers every task. kinds: worker -> behaviour."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n_tasks)
    rows = []
    for t in range(n_tasks):
        ws = range(len(accs)) if per_task is None else rng.choice(len(accs), per_task, replace=False)
        for w in ws:
            kind = (kinds or {}).get(int(w), "honest")
            if kind == "always_yes":
                ans = 1
            elif kind == "random":
                ans = int(rng.integers(0, 2))
            elif kind == "wrong":
                ans = 1 - truth[t]
            else:
                ans = truth[t] if rng.random() < accs[w] else 1 - truth[t]
            rows.append((f"t{t}", f"w{w}", "yes" if ans else "no"))
    return pd.DataFrame(rows, columns=["task", "worker", "label"]), truth


def test_majority_tie_goes_to_no_with_probability_half():
    df = pd.DataFrame({"task": ["a", "a"], "worker": ["x", "y"], "label": ["yes", "no"]})
    mv = MajorityVote().fit(df)
    assert mv.labels_["a"] == "no"
    assert mv.probas_.loc["a", "yes"] == 0.5


def test_confidence_table_reproduces_hand_computed_example():
    # calibration: A = 3 yes / 1 no (good), B = 1 yes / 3 no (bad). By hand (hypergeometric sub-samples):
    # P(good | 1 yes, 0 no) = (3/4) / (3/4 + 1/4) = 0.75; P(good | 2, 0) = (3/6) / (3/6 + 0) = 1;
    # P(good | 1, 1) = (3/6) / (3/6 + 3/6) = 0.5; P(good | 0, 2) = 0 / (0 + 3/6) = 0.
    votes = pd.DataFrame({"task": ["A"] * 4 + ["B"] * 4 + ["C", "D", "D"],
                          "worker": list("abcd") * 2 + ["a", "a", "b"],
                          "label": ["yes", "yes", "yes", "no", "yes", "no", "no", "no", "yes", "no", "no"]})
    ct = ConfidenceTable(min_votes=4, accept_at=0.9, reject_at=0.1).fit(votes)
    assert ct.lookup(1, 0) == pytest.approx(0.75)
    assert ct.lookup(2, 0) == pytest.approx(1.0)
    assert ct.lookup(1, 1) == pytest.approx(0.5)
    assert ct.lookup(0, 2) == pytest.approx(0.0)
    assert ct.decide().to_dict() == {"A": "accepted", "B": "rejected", "C": "pending", "D": "rejected"}


def test_confidence_table_per_group_and_uncalibrated_group_uses_pooled_table():
    votes = pd.DataFrame({"task": ["A"] * 4 + ["B"] * 4 + ["C"], "worker": list("abcd") * 2 + ["a"],
                          "label": ["yes"] * 3 + ["no"] + ["yes"] + ["no"] * 3 + ["yes"]})
    groups = pd.Series({"A": "n1", "B": "n1", "C": "n2"})
    ct = ConfidenceTable(min_votes=4).fit(votes, groups=groups)
    assert ct.probas_.loc["C", "yes"] == pytest.approx(0.75)  # n2 has no calibration images
    with pytest.raises(QCInputError, match="no group"):
        ConfidenceTable(min_votes=4).fit(votes, groups=groups.drop("C"))


def test_dawid_skene_beats_majority_with_one_strong_worker_multiclass():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 400)
    accs = [0.95, 0.5, 0.5, 0.5]
    rows = []
    for t in range(400):
        for w, a in enumerate(accs):
            lab = truth[t] if rng.random() < a else (truth[t] + rng.integers(1, 3)) % 3
            rows.append((t, w, int(lab)))
    df = pd.DataFrame(rows, columns=["task", "worker", "label"])
    ds = DawidSkene().fit(df)
    mv = MajorityVote().fit(df)
    acc_ds = (ds.labels_.sort_index().to_numpy().astype(int) == truth).mean()
    acc_mv = (mv.labels_.sort_index().to_numpy().astype(int) == truth).mean()
    assert acc_ds > 0.9 and acc_ds > acc_mv + 0.03
    assert ds.skills_.idxmax() == 0
    assert np.allclose(ds.probas_.sum(axis=1), 1.0)


def test_dawid_skene_stream_equals_in_memory():
    df, _ = crowd(300, [0.9, 0.8, 0.7, 0.6, 0.55], seed=1)
    ds = DawidSkene(n_iter=30).fit(df)
    enc = ds.encoded_

    def chunks():
        for s in range(0, len(enc.task), 97):  # odd chunk size on purpose
            yield enc.task[s:s + 97], enc.worker[s:s + 97], enc.label[s:s + 97]

    st = DawidSkene(n_iter=30).fit_stream(chunks, enc.n_tasks, enc.n_workers, 2)
    assert st.n_iter_ == ds.n_iter_
    np.testing.assert_allclose(st.probas_array_, ds.probas_array_, atol=1e-9)
    with pytest.raises(QCInputError, match="outside"):
        DawidSkene().fit_stream(lambda: iter([(np.array([5]), np.array([0]), np.array([0]))]), 2, 1, 2)


def test_dawid_skene_gold_pins_and_unknown_worker_is_ignored():
    df, truth = crowd(200, [0.9, 0.85, 0.8], seed=2)
    gold = pd.Series(np.where(truth[:20] == 1, "yes", "no"), index=[f"t{i}" for i in range(20)])
    ds = DawidSkene().fit(df, true_labels=gold)
    assert (ds.labels_[gold.index] == gold).all()
    new = pd.DataFrame({"task": ["n1", "n2", "n2"], "worker": ["stranger", "stranger", "w0"],
                        "label": ["yes", "no", "yes"]})
    p = ds.predict_proba(new)
    assert p.loc["n1", "yes"] == pytest.approx(float(ds.priors_["yes"]))  # only an unknown worker: the prior
    assert p.loc["n2", "yes"] > 0.8  # the stranger's "no" carries no weight, w0's "yes" does


@pytest.mark.parametrize("method", [MajorityVote, DawidSkene, ConfidenceTable, GoldFilter, AdaptiveConsensus])
def test_empty_input_gives_empty_result(method):
    empty = pd.DataFrame({"task": [], "worker": [], "label": []})
    model = method().fit(empty)
    assert len(model.probas_) == 0 and len(model.labels_) == 0


def test_missing_columns_and_nulls_are_refused_with_a_clear_error():
    with pytest.raises(QCInputError, match="missing column"):
        MajorityVote().fit(pd.DataFrame({"task": ["a"], "label": ["yes"]}))
    with pytest.raises(QCInputError, match="empty task, worker or label"):
        DawidSkene().fit(pd.DataFrame({"task": ["a"], "worker": [None], "label": ["yes"]}))
    with pytest.raises(QCInputError, match="not among the known labels"):
        AdaptiveConsensus().fit(pd.DataFrame({"task": ["a"], "worker": ["w"], "label": ["maybe"]}))


def test_adaptive_single_vote_tie_new_task_and_cap():
    votes = pd.DataFrame({"task": ["one", "tie", "tie"] + ["cap"] * 4, "worker": ["a", "a", "b", "a", "b", "c", "d"],
                          "label": ["yes", "yes", "no", "yes", "no", "yes", "no"]})
    ac = AdaptiveConsensus(max_votes=4).fit(votes, tasks=["one", "tie", "cap", "new"])
    d = ac.decisions_
    assert d.loc["one", "status"] == "pending" and 0.5 < d.loc["one", "p_yes"] < 0.99 and d.loc["one", "n_more"] >= 1
    assert d.loc["tie", "status"] == "pending" and d.loc["tie", "reason"] == "uncertain" and d.loc["tie", "n_more"] >= 1
    assert d.loc["cap", "status"] == "pending" and d.loc["cap", "n_more"] == 0 and d.loc["cap", "reason"] == "cap"
    assert d.loc["new", "n_more"] == 2 and d.loc["new", "reason"] == "new" and d.loc["new", "n_votes"] == 0
    assert set(ac.push_plan()["task"]) == {"one", "tie", "new"}


def test_spammers_are_detected_by_kind():
    kinds = {6: "always_yes", 7: "random", 8: "wrong"}
    df, _ = crowd(300, [0.9, 0.85, 0.8, 0.9, 0.85, 0.8, 0, 0, 0], seed=4, kinds=kinds)
    ac = AdaptiveConsensus().fit(df)
    w = ac.workers_.set_index("worker")
    assert w.loc["w6", "flag_reason"] == "always_yes"
    assert w.loc["w7", "flag_reason"] == "random"
    assert w.loc["w8", "flag_reason"] == "adversarial"
    assert not w.loc[[f"w{i}" for i in range(6)], "flagged"].any()
    assert not w.loc[["w6", "w7", "w8"], "votes_used"].any()


def test_adversaries_cannot_flip_a_label():
    # 3 honest workers and 5 adversaries who always answer wrong and fail the gold controls.
    kinds = {w: "wrong" for w in range(3, 8)}
    df, truth = crowd(60, [0.9, 0.9, 0.9] + [0] * 5, seed=5, kinds=kinds)
    gold_tasks = [f"t{i}" for i in range(10)]
    gold = pd.Series(np.where(truth[:10] == 1, "yes", "no"), index=gold_tasks)
    mv = MajorityVote().fit(df)
    assert (mv.labels_.to_numpy() != np.where(truth == 1, "yes", "no")).all()  # majority is flipped everywhere
    ac = AdaptiveConsensus().fit(df, true_labels=gold)
    d = ac.decisions_
    assert set(d.index).isdisjoint(gold_tasks)  # controls get no decision
    honest = MajorityVote().fit(df[df["worker"].isin(["w0", "w1", "w2"])]).labels_
    rest = [f"t{i}" for i in range(10, 60)]
    assert (ac.labels_.loc[rest] == honest.loc[rest]).all()  # what the honest workers alone say
    w = ac.workers_.set_index("worker")
    assert w.loc[[f"w{i}" for i in range(3, 8)], "flagged"].all()


def test_gold_filter_drops_failing_workers():
    kinds = {3: "wrong", 4: "wrong"}
    df, truth = crowd(40, [0.9, 0.9, 0.9, 0, 0], seed=6, kinds=kinds)
    gold = pd.Series(np.where(truth[:10] == 1, "yes", "no"), index=[f"t{i}" for i in range(10)])
    gf = GoldFilter(min_gold=5).fit(df, gold)
    assert list(gf.excluded_) == ["w3", "w4"]
    assert gf.skills_["w3"] == 0.0 and gf.skills_["w0"] > 0.7


def test_budget_per_group_is_respected():
    votes = pd.DataFrame({"task": ["a"], "worker": ["w"], "label": ["yes"]})
    groups = pd.Series({"a": "g1", "b": "g1", "c": "g1", "d": "g2"})
    ac = AdaptiveConsensus(budget_per_group=4, initial_votes=2).fit(votes, tasks=["a", "b", "c", "d"], groups=groups)
    d = ac.decisions_
    assert d.loc[d["group"] == "g1", "n_more"].sum() + 1 <= 4  # one vote already spent
    assert (d["reason"] == "budget").any()
    assert d.loc["d", "n_more"] == 2


def test_adaptive_stopping_reaches_precision_target_on_seeded_crowd():
    """Rounds of aggregate -> ask n_more -> aggregate on small seeded crowds with spammers (60 workers, Beta(8, 2),
    10 % at random): the accepted set is at least as precise as the threshold promises, and it costs well under the
    fixed 10 votes. One crowd of 60 workers varies a lot (up to 6.8 votes per image over seeds 0-31), so the
    votes are pooled over four crowds: 5.26 for seeds 4-7, at most 5.92 for each of the groups 0-3, ..., 28-31."""
    votes = 0
    for seed in (4, 5, 6, 7):
        rng = np.random.default_rng(seed)
        n_tasks, n_workers = 1500, 60
        truth = rng.integers(0, 2, n_tasks)
        acc = np.where(rng.random(n_workers) < 0.1, 0.5, rng.beta(8, 2, n_workers))
        order = np.array([rng.permutation(n_workers)[:10] for _ in range(n_tasks)])
        answers = np.where(rng.random((n_tasks, 10)) < acc[order], truth[:, None], 1 - truth[:, None])
        n = np.zeros(n_tasks, dtype=int)
        model = AdaptiveConsensus(accept_at=0.99, reject_at=0.01, max_votes=10)
        for _ in range(12):
            t, k = np.nonzero(np.arange(10)[None, :] < n[:, None])
            df = pd.DataFrame({"task": t, "worker": order[t, k], "label": np.where(answers[t, k] == 1, "yes", "no")})
            model.fit(df, tasks=range(n_tasks))
            more = model.decisions_["n_more"].reindex(range(n_tasks)).to_numpy()
            if not more.any():
                break
            n += more
        d = model.decisions_.reindex(range(n_tasks))
        accepted = d["status"].to_numpy() == "accepted"
        rejected = d["status"].to_numpy() == "rejected"
        assert accepted.sum() > 0.3 * n_tasks  # 0.41 or more over seeds 0-31
        assert truth[accepted].mean() >= 0.99  # precision of the accepted set (0.9918 or more over seeds 0-31)
        assert (1 - truth[rejected]).mean() >= 0.99
        votes += n.sum()
    assert votes / (4 * 1500) <= 6.25


def test_beta_8_2_crowd_settles_at_about_five_votes_per_image():
    """The Beta(8, 2) crowd of benchmarks/crowd_cost.py (10 % spammers) at the configuration RESULTS.md records
    (accept 0.995, blocking flagged workers and those estimated under 0.75, two votes to start, one more per round),
    at 5,000 tasks and 100 workers instead of 100,000 and 2,000: 99.6 % right at about 5 votes per image, as on the
    full crowd (99.66 % at 4.98). Per crowd the votes vary (up to 5.39 over seeds 0-31), so four are pooled:
    99.60 % at 4.997 votes for seeds 0-3; over the groups 0-3, ..., 28-31, 99.59 % or more at 5.17 or fewer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "crowd_cost.py"
    spec = importlib.util.spec_from_file_location("crowd_cost", path)
    crowd_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crowd_cost)
    right = votes = 0
    for seed in range(4):
        c = crowd_cost.make_crowd(5000, 100, 8, 2, 0.10, seed)
        model, used, rounds = crowd_cost.run_adaptive(c, True, rules=FlagRules(min_accuracy=0.75), accept_at=0.995,
                                                      reject_at=0.005, max_batch=1, initial_votes=2)
        p_yes = model.decisions_["p_yes"].reindex(range(5000)).to_numpy()
        right += ((p_yes > 0.5).astype(int) == c["truth"]).sum()
        votes += used.sum()
        assert set(np.flatnonzero(c["spammer"])) <= set(model.blocked_.astype(int))  # every spammer (seeds 0-31)
    assert right / 20_000 >= 0.994
    assert votes / 20_000 <= 5.3


def test_flag_rules_need_evidence():
    df = pd.DataFrame({"task": ["a", "b", "c"], "worker": ["w"] * 3, "label": ["yes"] * 3})
    ac = AdaptiveConsensus(rules=FlagRules(min_votes=20)).fit(df)
    assert not ac.workers_["flagged"].any()  # three yes answers are no proof of a constant answerer
