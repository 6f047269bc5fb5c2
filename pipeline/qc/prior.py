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


@dataclass(frozen=True)
class AgreementStats:
    """Per-worker sums behind `crowd_prior`, over the answers on tasks someone else also answered: `n` answers,
    `s1` / `s2` the sum of their agreement shares and of its square, `yes` how many were yes. Sums over tasks, so
    the stats of disjoint sets of tasks add up (QC keeps them per worker between rounds)."""

    n: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    yes: np.ndarray

    def __add__(self, other: AgreementStats) -> AgreementStats:
        return AgreementStats(*(a + b for a, b in zip(self.arrays(), other.arrays(), strict=True)))

    def __sub__(self, other: AgreementStats) -> AgreementStats:
        return AgreementStats(*(a - b for a, b in zip(self.arrays(), other.arrays(), strict=True)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.n, self.s1, self.s2, self.yes


def agreement_stats(task: np.ndarray, worker: np.ndarray, label: np.ndarray, n_workers: int | None = None,
                    n_tasks: int | None = None) -> AgreementStats:
    """`AgreementStats` of integer-coded binary answers (label 1 = yes), one entry per worker code."""
    task, worker, label = (np.asarray(a, dtype=np.int64) for a in (task, worker, label))
    n_workers = int(n_workers if n_workers is not None else (worker.max() + 1 if len(worker) else 0))
    if len(task) == 0:
        z = np.zeros(n_workers)
        return AgreementStats(z, z.copy(), z.copy(), z.copy())
    m = np.bincount(task, minlength=n_tasks or 0)
    yes = np.bincount(task, weights=label, minlength=n_tasks or 0)
    shared = m[task] >= 2
    t, w, lab = task[shared], worker[shared], label[shared]
    agree = np.where(lab == 1, yes[t] - 1, m[t] - yes[t] - 1) / np.maximum(m[t] - 1, 1)  # share of the others agreeing
    return AgreementStats(np.bincount(w, minlength=n_workers).astype(np.float64),
                          np.bincount(w, weights=agree, minlength=n_workers),
                          np.bincount(w, weights=agree * agree, minlength=n_workers),
                          np.bincount(w, weights=lab.astype(np.float64), minlength=n_workers))


def crowd_prior(task: np.ndarray, worker: np.ndarray, label: np.ndarray, fallback_accuracy: float = 0.8,
                fallback_strength: float = 4.0, min_workers: int = 20, min_shared: int = 2,
                strength_range: tuple[float, float] = STRENGTH_RANGE) -> CrowdPrior:
    """The crowd's Beta prior from integer-coded binary answers (label 1 = yes); the fixed prior when fewer
    than `min_workers` workers have `min_shared` answers on tasks someone else also answered, or when the
    answers agree no more often than chance would have them (then agreement says nothing about who is right)."""
    if len(np.asarray(task)) == 0:
        return fixed_prior(fallback_accuracy, fallback_strength, "no answers yet")
    return prior_from_stats(agreement_stats(task, worker, label), fallback_accuracy, fallback_strength, min_workers,
                            min_shared, strength_range)


def prior_from_stats(stats: AgreementStats, fallback_accuracy: float = 0.8, fallback_strength: float = 4.0,
                     min_workers: int = 20, min_shared: int = 2,
                     strength_range: tuple[float, float] = STRENGTH_RANGE) -> CrowdPrior:
    """`crowd_prior` from per-worker `AgreementStats` (of one fit, or summed over blocks of tasks)."""
    n_w = np.clip(stats.n, 0.0, None)
    total_shared = int(round(float(n_w.sum())))
    if total_shared == 0 and not len(n_w):
        return fixed_prior(fallback_accuracy, fallback_strength, "no answers yet")
    enough = n_w >= min_shared
    if enough.sum() < min_workers:
        return fixed_prior(fallback_accuracy, fallback_strength,
                           f"{int(enough.sum())} worker(s) with {min_shared}+ answers on shared tasks, "
                           f"{min_workers} needed", int(enough.sum()), total_shared)
    n = n_w[enough]
    s1, s2, yes = stats.s1[enough], stats.s2[enough], stats.yes[enough]
    big_n = float(n.sum())
    big_a = float(s1.sum()) / big_n
    if 2 * big_a - 1 <= 0.01:  # 2q - 1 <= 0.1: a crowd at chance level, or colluding against the truth
        return fixed_prior(fallback_accuracy, fallback_strength,
                           f"answers agree in {big_a:.1%} of pairs, about chance: agreement cannot tell "
                           "accuracy apart", int(enough.sum()), int(round(big_n)))
    q = (1.0 + np.sqrt(2 * big_a - 1)) / 2
    f = s1 / n
    k = len(n)
    msw = float((s2 - n * f * f).sum()) / max(big_n - k, 1.0)
    msb = float((n * (f - s1.sum() / big_n) ** 2).sum()) / max(k - 1, 1)
    n0 = (big_n - float((n * n).sum()) / big_n) / max(k - 1, 1)
    var_a = max(msb - msw, 0.0) / max(n0, 1e-9) / (2 * q - 1) ** 2
    mean = float(np.clip(((f - (1 - q)) / (2 * q - 1)).mean(), 0.5, 0.99))
    lo, hi = strength_range
    strength = hi if var_a <= 0 else float(np.clip(mean * (1 - mean) / var_a - 1.0, lo, hi))
    # the answers' yes share is pi q + (1 - pi)(1 - q) for a share pi of good images
    yes_share = float(np.clip((float(yes.sum()) / big_n - (1 - q)) / (2 * q - 1), 0.01, 0.99))
    return CrowdPrior(mean, strength, "crowd", int(k), int(round(big_n)), big_a, yes_share=yes_share)
