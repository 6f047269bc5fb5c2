"""Calibrated stopping: the crowd's own prior (empirical Bayes), its fallback, the leave-one-out posterior, and
decided posteriors that mean what they say on a hard crowd where the fixed 0.8 prior over-promises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.qc import AdaptiveConsensus, DawidSkene
from pipeline.qc.adaptive import leave_one_out_posterior
from pipeline.qc.prior import STRENGTH_RANGE, crowd_prior


def hard_crowd(n_tasks: int, n_workers: int, seed: int, cap: int = 10):
    """Accuracy ~ Beta(2.5, 1.5), 15 % spammers (0.5), 5 % adversaries (1 - accuracy); each task has `cap`
    distinct random workers in order, and their answers."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n_tasks)
    acc = rng.beta(2.5, 1.5, n_workers)
    kind = rng.choice(3, n_workers, p=[0.8, 0.15, 0.05])
    acc = np.where(kind == 1, 0.5, np.where(kind == 2, 1 - acc, acc))
    order = np.argsort(rng.random((n_tasks, n_workers)), axis=1)[:, :cap]
    answers = np.where(rng.random((n_tasks, cap)) < acc[order], truth[:, None], 1 - truth[:, None])
    return truth, order, answers, acc


def long_frame(order: np.ndarray, answers: np.ndarray, n: np.ndarray) -> pd.DataFrame:
    t, k = np.nonzero(np.arange(order.shape[1])[None, :] < n[:, None])
    return pd.DataFrame({"task": t, "worker": order[t, k], "label": np.where(answers[t, k] == 1, "yes", "no")})


def ece(p: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum((idx == b).mean() * abs(p[idx == b].mean() - truth[idx == b].mean())
                     for b in range(bins) if (idx == b).any()))


def test_crowd_prior_recovers_mean_and_spread_from_five_answers_per_task():
    """The agreement moments find the crowd's mean accuracy (spammers and adversaries included: about 0.6, not
    the fixed 0.8), a strength near the true one and the share of good images."""
    truth, order, answers, acc = hard_crowd(6000, 600, seed=0, cap=5)
    n = np.full(len(truth), 5)
    votes = long_frame(order, answers, n)
    t, w, lab = votes["task"].to_numpy(), votes["worker"].to_numpy(), (votes["label"] == "yes").to_numpy().astype(int)
    prior = crowd_prior(t, w, lab, strength_range=(0.0, 1e6))
    true_mean, true_var = acc.mean(), acc.var()
    assert prior.source == "crowd" and prior.workers == 600
    assert abs(prior.mean - true_mean) < 0.02
    true_strength = true_mean * (1 - true_mean) / true_var - 1
    assert 0.7 * true_strength < prior.strength < 1.4 * true_strength
    assert abs(prior.yes_share - truth.mean()) < 0.05
    clipped = crowd_prior(t, w, lab)
    assert STRENGTH_RANGE[0] <= clipped.strength <= STRENGTH_RANGE[1]


def test_crowd_prior_falls_back_to_prior_accuracy_without_enough_evidence():
    rng = np.random.default_rng(0)
    # five workers: too few to say anything about the crowd
    few = crowd_prior(np.repeat(np.arange(50), 3), np.tile([0, 1, 2], 50), rng.integers(0, 2, 150),
                      fallback_accuracy=0.8, fallback_strength=4.0)
    assert (few.source, few.mean, few.strength) == ("fixed", 0.8, 4.0) and "20 needed" in few.reason
    # one answer per task: nothing is shared, so agreement is unknown
    single = crowd_prior(np.arange(500), np.arange(500) % 100, rng.integers(0, 2, 500))
    assert single.source == "fixed" and single.shared_votes == 0
    # coin flippers: agreement at chance says nothing about who is right
    coins = crowd_prior(np.repeat(np.arange(2000), 3), rng.integers(0, 100, 6000), rng.integers(0, 2, 6000))
    assert coins.source == "fixed" and "chance" in coins.reason
    # the adaptive rule records the fallback and behaves as the fixed rule there
    votes = pd.DataFrame({"task": ["t1"] * 3 + ["t2"], "worker": ["a", "b", "c", "a"], "label": ["yes"] * 3 + ["no"]})
    ac = AdaptiveConsensus().fit(votes)
    assert ac.prior_.source == "fixed" and ac.prior_.mean == 0.8


def test_leave_one_out_posterior_weighs_each_vote_by_the_workers_other_answers():
    """Two workers, one yes each on one task: without the task itself they have no record, so each vote counts
    what the prior says, log(0.8 / 0.2); and on a random crowd the vectorised posterior equals a plain loop that
    rebuilds every worker's matrix from their other tasks."""
    votes = pd.DataFrame({"task": ["t", "t"], "worker": ["a", "b"], "label": ["yes", "yes"]})
    pseudo = np.array([[3.2, 0.8], [0.8, 3.2]])  # [observed, true]: 4 answers at 0.8
    ds = DawidSkene(n_iter=50, prior_matrix=pseudo, class_prior=(0.5, 0.5), labels=("no", "yes")).fit(votes)
    assert leave_one_out_posterior(ds, pseudo)[0] == pytest.approx(16 / 17)  # odds 4 x 4
    assert ds.probas_array_[0, 1] != pytest.approx(16 / 17)  # the plug-in posterior grades them on this task too

    truth, order, answers, _ = hard_crowd(60, 12, seed=4, cap=4)
    votes = long_frame(order, answers, np.full(60, 4))
    pseudo = np.array([[2.4, 1.6], [1.6, 2.4]])
    ds = DawidSkene(n_iter=50, prior_matrix=pseudo, labels=("no", "yes")).fit(votes)
    enc, post = ds.encoded_, ds.probas_array_
    expected = []
    for t in range(enc.n_tasks):
        lo = np.log(ds.priors_array_[1] / ds.priors_array_[0])
        for v in np.flatnonzero(enc.task == t):
            w, lab = enc.worker[v], enc.label[v]
            others = (enc.worker == w) & (enc.task != t)
            counts = pseudo.copy()
            for u in np.flatnonzero(others):
                counts[enc.label[u]] += post[enc.task[u]]
            err = counts / counts.sum(axis=0)
            lo += np.log(err[lab, 1] / err[lab, 0])
        expected.append(1 / (1 + np.exp(-lo)))
    np.testing.assert_allclose(leave_one_out_posterior(ds, pseudo), expected, rtol=1e-9)


def rounds_of_one_more_vote(truth, order, answers, calibrated: bool) -> AdaptiveConsensus:
    """Aggregate -> one more vote per pending image, up to 12 rounds, at accept 0.95 / reject 0.05."""
    n = np.zeros(len(truth), dtype=int)
    model = AdaptiveConsensus(accept_at=0.95, reject_at=0.05, max_batch=1, calibrated=calibrated)
    for _ in range(12):
        model.fit(long_frame(order, answers, n), tasks=range(len(truth)))
        more = model.decisions_["n_more"].reindex(range(len(truth))).to_numpy()
        if not more.any():
            break
        n += more
    return model


def decided(model: AdaptiveConsensus, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(posterior P(yes), truth) of the images the model decided."""
    d = model.decisions_.reindex(range(len(truth)))
    done = d["status"].isin(["accepted", "rejected"]).to_numpy()
    return d["p_yes"].to_numpy()[done], truth[done]


def test_decided_posteriors_are_calibrated_on_a_hard_crowd_unlike_the_fixed_prior():
    """Rounds of aggregate -> one more vote per pending image, on hard crowds whose workers have short records
    (1,000 workers, 1,000 images each): with the fixed 0.8 prior the decided images are right far less often than
    their posteriors claim; the calibrated rule's decided posteriors match what is true, to the issue's ECE <= 0.02.

    The ECE of about 500 decided images of one crowd is noisy (over 24 seeds, 0.0007 to 0.051; two seeds above
    0.02), so it is measured on the decided images of four crowds pooled: 0.0028 for seeds 0-3, at most 0.0174 (accuracy
    at least 95.9 %) for each of the six groups 0-3, 4-7, ..., 20-23."""
    pooled = []
    for seed in range(4):
        truth, order, answers, _ = hard_crowd(1000, 1000, seed=seed)
        model = rounds_of_one_more_vote(truth, order, answers, calibrated=True)
        assert model.prior_.source == "crowd"
        pooled.append(decided(model, truth))
        assert len(pooled[-1][0]) > 250  # it still decides a good share (420 to 565 of 1,000 here)
    p, t = np.concatenate([p for p, _ in pooled]), np.concatenate([t for _, t in pooled])
    ece_new, acc_new = ece(p, t), ((p > 0.5) == t).mean()
    assert ece_new <= 0.02 and acc_new >= 0.95  # as sure as it says (accept at 0.95): 0.0028, 97.6 % here

    truth, order, answers, _ = hard_crowd(1000, 1000, seed=0)
    old = rounds_of_one_more_vote(truth, order, answers, calibrated=False)
    assert old.prior_.source == "fixed"
    p_old, t_old = decided(old, truth)
    ece_old, acc_old = ece(p_old, t_old), ((p_old > 0.5) == t_old).mean()
    assert ece_old > 0.1 and acc_old < 0.85  # over-promises (0.24 and 74 % here)
    assert ece_old > 5 * ece_new


def test_calibrated_false_is_the_fixed_prior_plug_in_rule():
    """calibrated=False keeps the rule as it was: its posterior is a Dawid-Skene fit with prior_accuracy /
    prior_strength pseudo-answers on the unflagged workers' votes, nothing else."""
    truth, order, answers, _ = hard_crowd(400, 60, seed=5, cap=4)
    votes = long_frame(order, answers, np.full(len(truth), 4))
    ac = AdaptiveConsensus(calibrated=False).fit(votes)
    kept = votes[~votes["worker"].astype(str).isin(ac.workers_.loc[~ac.workers_["votes_used"], "worker"])]
    ds = DawidSkene(n_iter=100, tol=1e-6, prior_strength=4.0, prior_accuracy=0.8, labels=("no", "yes"),
                    class_prior_strength=2.0).fit(kept)
    np.testing.assert_allclose(ac.decisions_["p_yes"].reindex(ds.probas_.index).to_numpy(), ds.probas_["yes"].to_numpy())
    on = AdaptiveConsensus().fit(votes)
    assert on.prior_.source == "crowd" and on.prior_.mean < 0.75  # this crowd is no 0.8 crowd
    assert not np.allclose(on.decisions_["p_yes"].to_numpy(), ac.decisions_["p_yes"].to_numpy())


def test_class_share_is_held_when_the_fit_slides_to_one_label():
    """Three answers per image from weak workers with three answers each: here EM, left free, slides to "every
    image is good"; the rule holds the share of good images at the agreement moments' estimate instead."""
    truth, order, answers, _ = hard_crowd(3000, 3000, seed=2, cap=3)
    votes = long_frame(order, answers, np.full(len(truth), 3))
    ac = AdaptiveConsensus().fit(votes, tasks=range(len(truth)))
    free = DawidSkene(n_iter=100, tol=1e-6, prior_matrix=ac.prior_.matrix(2), labels=("no", "yes"),
                      class_prior_strength=2.0).fit(votes)
    assert free.priors_array_[1] > 0.95  # the free fit: nearly every image good
    assert ac.class_prior_note_.startswith("held at the crowd's estimate")
    p = ac.decisions_["p_yes"].to_numpy()
    assert 0.35 < p.mean() < 0.65
    assert (ac.decisions_["status"] == "accepted").mean() < 0.05  # nothing near-certain from three weak answers
    assert ((p > 0.5) == truth).mean() > 0.55
