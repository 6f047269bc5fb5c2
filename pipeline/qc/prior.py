"""The crowd's own prior on worker accuracy (empirical Bayes), from how often workers agree.

A worker with no record is assumed as accurate as a typical worker *of this crowd*, not a fixed 0.8, and a
worker with a short record is shrunk toward that typical worker by as many pseudo-answers as the spread of
the crowd warrants. Both numbers come from the answers alone, without a model fit and without gold:

- two answers on one task agree with probability ``a_i a_j + (1 - a_i)(1 - a_j)``; over random pairs of a crowd
  whose vote-weighted accuracy is ``q`` that is ``A = q^2 + (1 - q)^2``, so ``q = (1 + sqrt(2A - 1)) / 2``;
- worker i's share ``f_i`` of agreeing co-answers has mean ``(1 - q) + a_i (2q - 1)``: ``a_i`` is estimated without
  bias by ``(f_i - (1 - q)) / (2q - 1)``; their mean over workers is the prior mean, and the between-worker
  variance of ``a`` (one-way random-effects ANOVA on the per-answer agreement shares, which removes the
  sampling noise of short records) gives the Beta's strength ``a + b = mean (1 - mean) / variance - 1``;
- the answers' share of yes is ``pi q + (1 - pi)(1 - q)`` for a share ``pi`` of good images: ``yes_share``
  estimates ``pi`` (the adaptive rule holds the class prior there when its own fit drifts away from it).

Why not fit the prior to Dawid-Skene's own estimates? With two or three answers per task a worker's answer is
a large part of the posterior they are graded against, so every worker looks better than they are (and a
method of moments on those soft counts sees almost no spread); the agreement moments do not use the
posteriors, so they hold with two answers per task.

The strength is kept within `STRENGTH_RANGE`. Assumptions: one accuracy per worker for both labels (sensitivity = specificity in the prior; each worker's
own matrix is still estimated per label), co-workers of a task drawn independently of each other. Workers
worse than chance enter as low accuracies; the Beta matches the mixture's mean and variance.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> acc = rng.beta(6, 2, 400)                     # a crowd: mean 0.75
    >>> truth = rng.integers(0, 2, 4000)
    >>> task = np.repeat(np.arange(4000), 3)
    >>> worker = np.concatenate([rng.choice(400, 3, replace=False) for _ in range(4000)])
    >>> label = np.where(rng.random(12000) < acc[worker], truth[task], 1 - truth[task])
    >>> p = crowd_prior(task, worker, label)
    >>> p.source, round(p.mean, 2), 4 < p.strength <= 8
    ('crowd', 0.75, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Pseudo-answers behind the crowd prior. At least 2: never a flat prior. At most 8: one Beta fitted by moments to a
# crowd that mixes careful workers with weak ones puts the best workers nearer the mean than they are; on the
# Beta(8, 2) crowd of benchmarks/crowd_cost.py the moments gave about 24 once flagged workers were out, which shrinks
# a 95 %-accurate regular enough to cost votes (measured there: 4.93 votes per image with the cap at 4, 4.98 at 8,
# 5.00 at 10, accuracy 99.64-99.66 % throughout). The cap binds only on crowds whose workers have long records,
# where the prior hardly moves calibration; on the long-tail and sparse crowds of benchmarks/calibration.py the
# moments gave 4.3-6.9.
STRENGTH_RANGE = (2.0, 8.0)


@dataclass(frozen=True)
class CrowdPrior:
    """Beta(mean * strength, (1 - mean) * strength) on a worker's accuracy. `source` "crowd" (estimated) or
    "fixed" (the configured fallback); `reason` says why the fallback was taken."""

    mean: float
    strength: float
    source: str
    workers: int = 0  # workers with answers on shared tasks (the evidence behind an estimate)
    shared_votes: int = 0
    agreement: float = float("nan")  # share of agreeing pairs of answers
    reason: str = ""
    yes_share: float = float("nan")  # share of images that are good, by the same moments (see crowd_prior)

    def matrix(self, k: int = 2) -> np.ndarray:
        """(k, k) pseudo-counts [observed, true] for a Dawid-Skene confusion matrix."""
        m = np.full((k, k), self.strength * (1.0 - self.mean) / max(k - 1, 1))
        np.fill_diagonal(m, self.strength * self.mean)
        return m


def fixed_prior(accuracy: float, strength: float, reason: str = "", workers: int = 0,
                shared_votes: int = 0) -> CrowdPrior:
    return CrowdPrior(float(accuracy), float(strength), "fixed", workers, shared_votes, reason=reason)


def crowd_prior(task: np.ndarray, worker: np.ndarray, label: np.ndarray, fallback_accuracy: float = 0.8,
                fallback_strength: float = 4.0, min_workers: int = 20, min_shared: int = 2,
                strength_range: tuple[float, float] = STRENGTH_RANGE) -> CrowdPrior:
    """The crowd's Beta prior from integer-coded binary answers (label 1 = yes); the fixed prior when fewer
    than `min_workers` workers have `min_shared` answers on tasks someone else also answered, or when the
    answers agree no more often than chance would have them (then agreement says nothing about who is right)."""
    task, worker, label = (np.asarray(a, dtype=np.int64) for a in (task, worker, label))
    if len(task) == 0:
        return fixed_prior(fallback_accuracy, fallback_strength, "no answers yet")
    m = np.bincount(task)
    yes = np.bincount(task, weights=label)
    shared = m[task] >= 2
    t, w, lab = task[shared], worker[shared], label[shared]
    n_w = np.bincount(w, minlength=int(worker.max()) + 1).astype(np.float64)
    enough = n_w >= min_shared
    if enough.sum() < min_workers:
        return fixed_prior(fallback_accuracy, fallback_strength,
                           f"{int(enough.sum())} worker(s) with {min_shared}+ answers on shared tasks, "
                           f"{min_workers} needed", int(enough.sum()), int(shared.sum()))
    agree = np.where(lab == 1, yes[t] - 1, m[t] - yes[t] - 1) / (m[t] - 1)  # share of the others that agree
    sel = enough[w]
    t, w, agree = t[sel], w[sel], agree[sel]
    big_a = float(agree.mean())
    if 2 * big_a - 1 <= 0.01:  # 2q - 1 <= 0.1: a crowd at chance level, or colluding against the truth
        return fixed_prior(fallback_accuracy, fallback_strength,
                           f"answers agree in {big_a:.1%} of pairs, about chance: agreement cannot tell "
                           "accuracy apart", int(enough.sum()), int(len(t)))
    q = (1.0 + np.sqrt(2 * big_a - 1)) / 2
    n = n_w[enough]
    s1 = np.bincount(w, weights=agree, minlength=len(n_w))[enough]
    s2 = np.bincount(w, weights=agree * agree, minlength=len(n_w))[enough]
    f = s1 / n
    k, big_n = len(n), float(n.sum())
    msw = float((s2 - n * f * f).sum()) / max(big_n - k, 1.0)
    msb = float((n * (f - s1.sum() / big_n) ** 2).sum()) / max(k - 1, 1)
    n0 = (big_n - float((n * n).sum()) / big_n) / max(k - 1, 1)
    var_a = max(msb - msw, 0.0) / max(n0, 1e-9) / (2 * q - 1) ** 2
    mean = float(np.clip(((f - (1 - q)) / (2 * q - 1)).mean(), 0.5, 0.99))
    lo, hi = strength_range
    strength = hi if var_a <= 0 else float(np.clip(mean * (1 - mean) / var_a - 1.0, lo, hi))
    # the answers' yes share is pi q + (1 - pi)(1 - q) for a share pi of good images
    yes_share = float(np.clip((label[shared][sel].mean() - (1 - q)) / (2 * q - 1), 0.01, 0.99))
    return CrowdPrior(mean, strength, "crowd", int(k), int(len(t)), big_a, yes_share=yes_share)
