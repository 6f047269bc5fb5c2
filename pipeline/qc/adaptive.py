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

from pipeline.qc.base import NO, YES, Aggregator, QCInputError, check_long, empty_encoded, encode
from pipeline.qc.dawid_skene import DawidSkene
from pipeline.qc.engine import (
    DECISION_COLUMNS,
    DRIFT_LOG_ODDS,
    Chunks,
    Fit,
    Params,
    adaptive_decisions,
    apply_budget,
    fit_model,
    logit,
    loo_posterior,
)
from pipeline.qc.prior import CrowdPrior, crowd_prior, fixed_prior
from pipeline.qc.workers import WORKER_COLUMNS, FlagRules

__all__ = ["DECISION_COLUMNS", "DRIFT_LOG_ODDS", "AdaptiveConsensus", "apply_budget", "crowd_prior", "expected_errors",
           "fixed_prior", "group_precision", "leave_one_out_posterior"]
_logit = logit


class AdaptiveConsensus(Aggregator):
    """Worker-aware posterior + stopping rule. After `fit`: decisions_ (per task), workers_ (per worker),
    precision_ (per group), fit_ (the integer-coded `pipeline.qc.engine.Fit`), and the Aggregator attributes
    probas_, labels_, skills_. The work is `pipeline.qc.engine.fit_model`, which QC's rounds run too."""

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

    @property
    def params(self) -> Params:
        return Params(accept_at=self.accept_at, reject_at=self.reject_at, max_votes=self.max_votes,
                      initial_votes=self.initial_votes, max_batch=self.max_batch, budget_per_group=self.budget_per_group,
                      prior_accuracy=self.prior_accuracy, prior_strength=self.prior_strength, n_iter=self.n_iter,
                      tol=self.tol, rules=self.rules, class_prior_strength=self.class_prior_strength,
                      calibrated=self.calibrated, prior_min_workers=self.prior_min_workers)

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
        gold_arr = np.full(enc.n_tasks, -1, dtype=np.int64)
        gold_t = enc.tasks.get_indexer(gold.index)
        gold_arr[gold_t[gold_t >= 0]] = np.where(gold.to_numpy() == YES, 1, 0)[gold_t >= 0]
        params = self.params
        fit = fit_model(Chunks.of(enc.task, enc.worker, enc.label, enc.n_tasks, enc.n_workers), gold_arr, params,
                        names=enc.workers)
        wt = fit.table

        # decisions for every non-gold task
        all_tasks = pd.Index(pd.unique(pd.Index(list(tasks)).append(enc.tasks)) if tasks is not None else enc.tasks,
                             name="task")
        all_tasks = all_tasks[~all_tasks.isin(gold.index)]
        pos = enc.tasks.get_indexer(all_tasks)
        voted = pos >= 0
        at = lambda a, fill: np.where(voted, a[np.maximum(pos, 0)], fill) if enc.n_tasks else np.full(len(pos), fill)  # noqa: E731
        n_votes, n_yes, n_used = at(fit.n_votes, 0), at(fit.n_yes, 0), at(fit.n_kept, 0)
        p_yes = at(fit.p, fit.prior_yes).astype(np.float64)
        grp = (groups.reindex(all_tasks).to_numpy(dtype=object) if groups is not None
               else np.full(len(all_tasks), "__all__", dtype=object))
        if groups is not None and pd.isna(grp).any():
            raise QCInputError(f"groups: no synset for {int(pd.isna(grp).sum())} task(s), e.g. "
                               f"{list(all_tasks[pd.isna(grp)][:3])}")
        dec = adaptive_decisions(all_tasks, grp, n_votes, n_yes, n_used, p_yes, params, fit.step)
        self.fit_: Fit = fit
        self.decisions_ = dec
        self.workers_ = wt[WORKER_COLUMNS]
        self.blocked_ = pd.Index(wt.loc[wt["flagged"], "worker"], name="worker")
        self.vote_step_ = fit.step
        self.prior_: CrowdPrior = fit.prior
        self.class_prior_note_ = fit.class_note
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
    counts = num.reshape(enc.n_workers, k, k)  # [worker, observed, true]
    mask = enc.tasks.isin(pinned) if pinned is not None and len(pinned) else None
    return loo_posterior(Chunks.of(enc.task, enc.worker, enc.label, enc.n_tasks, enc.n_workers), p[:, 1], counts,
                         pseudo, ds.priors_array_, mask)


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


