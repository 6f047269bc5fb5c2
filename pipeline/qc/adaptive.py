"""Adaptive consensus: decide each (image, wnid) from a worker-aware posterior, and ask only for the votes
still needed.

1. Fit a binary Dawid-Skene model with Beta pseudo-counts on every worker's matrix (`prior_strength`
   answers at `prior_accuracy`), gold tasks pinned to their known answers; build the worker table and
   flag spammers / adversaries (see `workers.py`). The flags depend on this fit only.
2. Refit on the unflagged workers' votes only: a flagged worker's answers never move a label, so
   adversaries cannot flip one and coin-flippers cannot dilute one. With `calibrated` (the default) this
   posterior is made to mean what it says on crowds whose typical worker is 60-70 % accurate, where a fixed
   0.8 prior let three or four agreeing votes pass for certainty:
   - empirical Bayes: every worker is shrunk toward the crowd's own prior (`pipeline.qc.prior`), a Beta on
     accuracy whose mean and strength come from how often the unflagged workers agree with each other
     (truth-free moments, not the fit's own estimates, which flatter every worker when tasks have two or
     three answers); with too little evidence (fewer than `prior_min_workers` workers with two answers on
     tasks someone else answered, or agreement at about chance level) the fixed `prior_accuracy` /
     `prior_strength` prior is used instead;
   - the share of good images is re-estimated by the fit unless it drifts more than an odds ratio of 4
     from the same moments' estimate (weak votes let EM slide toward "every image is bad"); then it is held
     at the moments' value;
   - leave-one-out posterior: each vote on a task is weighed by its worker's matrix estimated without that
     task, so a worker is never graded on the answer being graded (with few answers per worker, that
     self-agreement made the plug-in posterior over-confident).
   `prior_` and `class_prior_note_` record what was used. `calibrated=False` is the rule as it was before
   (fixed prior, plug-in posterior), kept for comparison (benchmarks/calibration.py). ImageNet's own check,
   a per-synset confidence table on images with >= 10 votes, is `ConfidenceTable` (QC method
   "confidence-table"); this rule does not use it.
3. Stopping rule per task: accept at P(yes) >= accept_at, reject at P(yes) <= reject_at; otherwise ask
   for k more votes, k = the log-odds still missing divided by what one typical worker's vote adds
   (at least 1, at most `max_batch`, never past `max_votes` per task); a task at the cap stays pending
   (its posterior is kept, it is not asked again); a synset's pending tasks share `budget_per_group`
   votes, cheapest-to-finish first.

    >>> import pandas as pd
    >>> votes = pd.DataFrame({"task": ["t1"] * 3 + ["t2"], "worker": ["a", "b", "c", "a"],
    ...                       "label": ["yes", "yes", "yes", "no"]})
    >>> ac = AdaptiveConsensus(accept_at=0.95, reject_at=0.05).fit(votes, tasks=["t1", "t2", "t3"])
    >>> ac.decisions_[["status", "n_more", "reason"]].values.tolist()
    [['accepted', 0, 'decided'], ['pending', 1, 'uncertain'], ['pending', 2, 'new']]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from pipeline.qc.base import NO, YES, Aggregator, QCInputError, check_long, counts, empty_encoded, encode
from pipeline.qc.dawid_skene import EPS, DawidSkene
from pipeline.qc.prior import CrowdPrior, crowd_prior, fixed_prior
from pipeline.qc.workers import WORKER_COLUMNS, FlagRules, confusion, gold_stats, wilson_upper, worker_table

DRIFT_LOG_ODDS = float(np.log(4.0))  # fitted class share this far (odds ratio 4) from the moments' share: held there
DECISION_COLUMNS = ["group", "n_votes", "n_yes", "n_used", "p_yes", "status", "n_more", "reason"]


def _logit(p: np.ndarray | float) -> Any:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return np.log(p / (1 - p))


class AdaptiveConsensus(Aggregator):
    """Worker-aware posterior + stopping rule. After `fit`: decisions_ (per task), workers_ (per worker),
    precision_ (per group), and the Aggregator attributes probas_, labels_, skills_."""

    def __init__(self, accept_at: float = 0.99, reject_at: float = 0.01, max_votes: int = 10, initial_votes: int = 2,
                 max_batch: int | None = None, budget_per_group: int | None = None, prior_accuracy: float = 0.8,
                 prior_strength: float = 4.0, n_iter: int = 100, tol: float = 1e-6, rules: FlagRules | None = None,
                 class_prior_strength: float = 2.0, calibrated: bool = True, prior_min_workers: int = 20):
        if not 0.0 < reject_at < 0.5 < accept_at < 1.0:
            raise ValueError("need 0 < reject_at < 0.5 < accept_at < 1")
        if max_votes < 1 or initial_votes < 1:
            raise ValueError("max_votes and initial_votes must be >= 1")
        self.accept_at, self.reject_at = accept_at, reject_at
        self.max_votes, self.initial_votes, self.max_batch = max_votes, initial_votes, max_batch
        self.budget_per_group = budget_per_group
        self.prior_accuracy, self.prior_strength = prior_accuracy, prior_strength
        self.n_iter, self.tol = n_iter, tol
        self.rules = rules or FlagRules()
        self.class_prior_strength = class_prior_strength
        self.calibrated, self.prior_min_workers = calibrated, prior_min_workers

    def _ds(self, prior: CrowdPrior | None = None, yes_share: float | None = None) -> DawidSkene:
        return DawidSkene(n_iter=self.n_iter, tol=self.tol, prior_strength=self.prior_strength,
                          prior_accuracy=self.prior_accuracy, labels=(NO, YES),
                          class_prior_strength=self.class_prior_strength,
                          prior_matrix=None if prior is None or prior.source != "crowd" else prior.matrix(2),
                          class_prior=None if yes_share is None else (1.0 - yes_share, yes_share))

    def _prior(self, data: pd.DataFrame) -> CrowdPrior:
        if not self.calibrated:
            return fixed_prior(self.prior_accuracy, self.prior_strength, "calibrated is off")
        if not len(data):
            return fixed_prior(self.prior_accuracy, self.prior_strength, "no answers yet")
        enc = encode(data, (NO, YES))
        return crowd_prior(enc.task, enc.worker, enc.label, self.prior_accuracy, self.prior_strength,
                           min_workers=self.prior_min_workers)

    def fit(self, data: pd.DataFrame, true_labels: pd.Series | None = None, tasks: Iterable[Any] | None = None,
            groups: pd.Series | None = None) -> AdaptiveConsensus:
        """`data`: long frame with yes/no labels; `true_labels`: task -> yes/no for gold (control) tasks, which
        train the worker model but get no decision; `tasks`: every task to decide, including ones nobody has
        voted on yet; `groups`: task -> synset, for budgets and per-synset precision."""
        data = check_long(data)
        gold = pd.Series(dtype=object) if true_labels is None else true_labels.dropna()
        if len(gold) and not gold.isin([YES, NO]).all():
            raise QCInputError(f"gold answers must be 'yes' or 'no', got {sorted(set(gold) - {YES, NO})[:5]}")
        enc = encode(data, (NO, YES)) if len(data) else empty_encoded()
        gold_t = enc.tasks.get_indexer(gold.index)
        gold_l = np.where(gold.to_numpy() == YES, 1, 0)
        gold_pairs = (gold_t[gold_t >= 0], gold_l[gold_t >= 0])

        # 1. gold failures first (hard evidence), then a model fit without them -> worker table and flags
        gold_n, gold_correct = gold_stats(enc, gold_pairs[0], gold_pairs[1])
        r = self.rules
        failed = (gold_n >= r.min_gold) & (wilson_upper(gold_correct, gold_n) < r.gold_min_accuracy)
        not_failed = ~failed[enc.worker] if len(data) else np.zeros(0, dtype=bool)
        ds_all = self._ds().fit(data[not_failed], true_labels=gold if len(gold) else None)
        probas_all = np.tile(ds_all.priors_array_, (enc.n_tasks, 1))
        if not_failed.any():
            pos_all = ds_all.encoded_.tasks.get_indexer(enc.tasks)
            probas_all[pos_all >= 0] = ds_all.probas_array_[pos_all[pos_all >= 0]]
        errors = confusion(enc, probas_all, pseudo=self.prior_strength / 4 or 1e-3)
        wt = worker_table(enc, probas_all, errors, gold_pairs[0], gold_pairs[1], self.rules)
        dropped = set(wt.loc[~wt["votes_used"], "worker"])
        keep = ~data["worker"].astype(str).isin(dropped).to_numpy() if len(data) else np.zeros(0, dtype=bool)

        # 2. posterior from unflagged workers only; calibrated: each shrunk toward the crowd's prior, the class
        # share held when the fit drifts off it, and every vote weighed by its worker's record on other tasks
        prior = self._prior(data[keep])
        fit_gold = gold if len(gold) else None
        ds = self._ds(prior).fit(data[keep], true_labels=fit_gold)
        self.class_prior_note_ = "fitted"
        if prior.source == "crowd" and keep.any():
            fitted = float(ds.priors_array_[1])
            if abs(float(_logit(fitted)) - float(_logit(prior.yes_share))) > DRIFT_LOG_ODDS:
                # weak votes leave the class share nearly unconstrained, and EM can slide to "every image is
                # bad" (each worker's yes-rate then fits one column of their matrix): hold it at the moments
                ds = self._ds(prior, prior.yes_share).fit(data[keep], true_labels=fit_gold)
                self.class_prior_note_ = (f"held at the crowd's estimate {prior.yes_share:.3f} (the fit drifted "
                                          f"to {fitted:.3f})")
        prior_yes = float(ds.priors_array_[1]) if keep.any() else 0.5
        p_fit = ds.probas_array_[:, 1] if keep.any() else np.zeros(0)
        if keep.any() and self.calibrated:
            p_fit = leave_one_out_posterior(ds, prior.matrix(2), gold.index)
        p_kept = pd.Series(p_fit, index=ds.encoded_.tasks, dtype=float)
        skills_kept = ds.skills_ if keep.any() else pd.Series(dtype=float)
        used_votes = keep.astype(np.float64)

        # 3. decisions for every non-gold task
        c = counts(enc.task, enc.label, enc.n_tasks, 2)
        used = np.bincount(enc.task, weights=used_votes, minlength=enc.n_tasks) if enc.n_tasks else np.zeros(0)
        all_tasks = pd.Index(pd.unique(pd.Index(list(tasks)).append(enc.tasks)) if tasks is not None else enc.tasks,
                             name="task")
        all_tasks = all_tasks[~all_tasks.isin(gold.index)]
        pos = enc.tasks.get_indexer(all_tasks)
        voted = pos >= 0
        n_votes = np.where(voted, c[pos, :].sum(axis=1), 0).astype(np.int64) if enc.n_tasks else np.zeros(len(all_tasks), np.int64)
        n_yes = np.where(voted, c[pos, 1], 0).astype(np.int64) if enc.n_tasks else np.zeros(len(all_tasks), np.int64)
        n_used = np.where(voted, used[pos], 0).astype(np.int64) if enc.n_tasks else np.zeros(len(all_tasks), np.int64)
        p_yes = p_kept.reindex(all_tasks).fillna(prior_yes).to_numpy()
        status = np.where(p_yes >= self.accept_at, "accepted", np.where(p_yes <= self.reject_at, "rejected", "pending"))
        status = np.where(n_used == 0, "pending", status)  # the class prior alone never decides an image

        # what one more vote from a typical (vote-weighted) unflagged worker adds, in log-odds
        acc = float(np.average(skills_kept.to_numpy(), weights=np.bincount(
            ds.encoded_.worker, minlength=len(skills_kept)))) if len(skills_kept) else self.prior_accuracy
        step = float(_logit(min(max(acc, 0.6), 0.95)))
        lo = _logit(p_yes)
        gap = np.where(lo >= 0, _logit(self.accept_at) - lo, lo - _logit(self.reject_at))
        room = np.maximum(self.max_votes - n_votes, 0)
        need = np.maximum(np.ceil(gap / step), 1).astype(np.int64)
        need = np.where(n_votes == 0, self.initial_votes, need)
        if self.max_batch:
            need = np.minimum(need, self.max_batch)
        need = np.minimum(need, room)
        pending = status == "pending"
        reason = np.where(~pending, "decided", np.where(room == 0, "cap", np.where(n_votes == 0, "new", "uncertain")))
        n_more = np.where(pending, need, 0)

        grp = (groups.reindex(all_tasks).to_numpy(dtype=object) if groups is not None
               else np.full(len(all_tasks), "__all__", dtype=object))
        if groups is not None and pd.isna(grp).any():
            raise QCInputError(f"groups: no synset for {int(pd.isna(grp).sum())} task(s), e.g. "
                               f"{list(all_tasks[pd.isna(grp)][:3])}")
        dec = pd.DataFrame({"group": grp, "n_votes": n_votes, "n_yes": n_yes, "n_used": n_used, "p_yes": p_yes,
                            "status": status, "n_more": n_more, "reason": reason}, index=all_tasks,
                           columns=DECISION_COLUMNS)
        if self.budget_per_group is not None:
            dec = apply_budget(dec, self.budget_per_group)
        self.decisions_ = dec
        self.workers_ = wt[WORKER_COLUMNS]
        self.blocked_ = pd.Index(wt.loc[wt["flagged"], "worker"], name="worker")
        self.vote_step_ = step
        self.prior_ = prior
        self.precision_ = group_precision(dec)

        probas = np.column_stack([1 - p_yes, p_yes]) if len(p_yes) else np.zeros((0, 2))
        self.probas_ = pd.DataFrame(probas, index=all_tasks, columns=pd.Index([NO, YES], name="label"))
        self.labels_ = pd.Series(np.where(p_yes > 0.5, YES, NO), index=all_tasks, name="agg_label", dtype=object)
        self.skills_ = pd.Series(wt["estimated_accuracy"].to_numpy(), index=pd.Index(wt["worker"], name="worker"),
                                 name="skill")
        return self

    def push_plan(self) -> pd.DataFrame:
        """Rows (task, n_more, reason, n_votes, p_yes) for tasks that need more votes."""
        d = self.decisions_
        plan = d[d["n_more"] > 0]
        return pd.DataFrame({"task": plan.index, "n_more": plan["n_more"].to_numpy(), "reason": plan["reason"].to_numpy(),
                             "n_votes": plan["n_votes"].to_numpy(), "p_yes": plan["p_yes"].to_numpy()})


def leave_one_out_posterior(ds: DawidSkene, pseudo: np.ndarray, pinned: pd.Index | None = None) -> np.ndarray:
    """P(yes) per task of a fitted binary Dawid-Skene model, each vote weighed by its worker's matrix estimated
    without that task (the fit's soft counts minus the task's own share, plus the `pseudo` counts), so a worker
    is never graded on the answer being graded. Tasks in `pinned` (gold) keep the fit's pinned answers."""
    enc = ds.encoded_
    p = ds.probas_array_
    k = 2
    num = np.zeros((enc.n_workers * k, k))
    wl = enc.worker * k + enc.label
    for c in range(k):
        num[:, c] = np.bincount(wl, weights=p[enc.task, c], minlength=enc.n_workers * k)
    num = num.reshape(enc.n_workers, k, k)  # [worker, observed, true]
    col = num.sum(axis=1) + pseudo.sum(axis=0)[None, :]  # [worker, true]
    pt = p[enc.task]  # [vote, true]
    cell = num[enc.worker, enc.label, :] - pt + pseudo[enc.label, :]
    err = np.clip(cell, EPS, None) / np.clip(col[enc.worker] - pt, EPS, None)
    diff = np.log(err[:, 1]) - np.log(err[:, 0])
    pri = np.clip(ds.priors_array_, EPS, None)
    lo = np.log(pri[1]) - np.log(pri[0]) + np.bincount(enc.task, weights=diff, minlength=enc.n_tasks)
    out = 1.0 / (1.0 + np.exp(-lo))
    if pinned is not None and len(pinned):
        gold = enc.tasks.isin(pinned)
        out[gold] = p[gold, 1]
    return out


def apply_budget(dec: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Within each group, give what is left of `budget` votes to the pending tasks closest to a decision (fewest
    votes asked first); the others get n_more 0 and reason "budget". `dec` has DECISION_COLUMNS."""
    dec = dec.copy()
    spent = dec.groupby("group", sort=False)["n_votes"].transform("sum")
    order = dec.assign(_k=dec["n_more"], _t=dec.index.astype(str)).sort_values(["group", "_k", "_t"])
    cum = order.groupby("group", sort=False)["n_more"].cumsum()
    over = cum > (budget - spent.reindex(order.index))
    cut = order.index[over & (order["n_more"] > 0)]
    dec.loc[cut, "n_more"] = 0
    dec.loc[cut, "reason"] = "budget"
    return dec


def group_precision(dec: pd.DataFrame) -> pd.DataFrame:
    """Per group: counts by status and the estimated precision of the accepted set (mean P(yes) over it)."""
    if dec.empty:
        return pd.DataFrame(columns=["group", "n_tasks", "accepted", "rejected", "pending", "n_votes",
                                     "votes_per_task", "est_precision"])
    d = dec.assign(acc=dec["status"].eq("accepted"), rej=dec["status"].eq("rejected"), pen=dec["status"].eq("pending"),
                   p_acc=dec["p_yes"].where(dec["status"].eq("accepted")))
    out = d.groupby("group", sort=True).agg(n_tasks=("status", "size"), accepted=("acc", "sum"), rejected=("rej", "sum"),
                                           pending=("pen", "sum"), n_votes=("n_votes", "sum"), est_precision=("p_acc", "mean"))
    out["votes_per_task"] = out["n_votes"] / out["n_tasks"]
    return out.reset_index()[["group", "n_tasks", "accepted", "rejected", "pending", "n_votes", "votes_per_task",
                              "est_precision"]]


def expected_errors(p_yes: np.ndarray, status: np.ndarray) -> float:
    """Expected number of wrong decisions among decided tasks, from their posteriors."""
    acc = status == "accepted"
    rej = status == "rejected"
    return float((1 - p_yes[acc]).sum() + p_yes[rej].sum())


