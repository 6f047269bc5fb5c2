"""ImageNet's per-synset confidence table (Deng et al., CVPR 2009, section 3.1.2).

For each synset (group), an initial subset of images gets >= `min_votes` answers; their majority answer
is taken as the truth. From that subset the table P(good | #yes, #no) is built for every vote count up to
the subset's size: an image with Y yes out of N answers contributes the hypergeometric probability that a
random m = y + n of its N answers hold exactly y yes, weighted by whether it is good. Every other image
then looks its own (#yes, #no) up, and is accepted once that probability passes `accept_at`.

Pooling all sub-samples of each calibration image (instead of, say, its first m answers) uses every
answer, and the table does not depend on the order the answers arrived in.

    >>> import pandas as pd
    >>> votes = pd.DataFrame({"task": ["A"] * 4 + ["B"] * 4 + ["C"],
    ...                       "worker": list("abcd") * 2 + ["a"],
    ...                       "label": ["yes", "yes", "yes", "no", "yes", "no", "no", "no", "yes"]})
    >>> ct = ConfidenceTable(min_votes=4, smoothing=0.0).fit(votes)
    >>> float(ct.lookup(1, 0)), float(ct.lookup(2, 0)), float(ct.lookup(1, 1))
    (0.75, 1.0, 0.5)
    >>> round(float(ct.probas_.loc["C", "yes"]), 2)
    0.75
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.qc.base import NO, YES, Aggregator, QCInputError, counts, empty_encoded, encode, worker_accuracy

ALL = "__all__"


def _log_comb(logfact: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log C(a, b) elementwise; -inf where b < 0 or b > a."""
    valid = (b >= 0) & (b <= a)
    out = np.full(np.broadcast(a, b).shape, -np.inf)
    a_b, b_b = np.broadcast_arrays(a, b)
    out[valid] = logfact[a_b[valid]] - logfact[b_b[valid]] - logfact[a_b[valid] - b_b[valid]]
    return out


def build_table(n_yes: np.ndarray, n_total: np.ndarray, good: np.ndarray, max_m: int, smoothing: float,
                prior: float, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """P(good | y yes out of m) and its support (expected number of calibration images) for 0 <= y <= m <= max_m.
    `weights`: how many calibration images each (n_yes, n_total, good) row stands for (default one each).

    Returns two (max_m + 1, max_m + 1) arrays indexed [y, m]; cells with y > m are NaN.
    """
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, max(int(n_total.max(initial=0)), max_m) + 1)))])
    y = np.arange(max_m + 1)[:, None, None]
    m = np.arange(max_m + 1)[None, :, None]
    big_y = n_yes[None, None, :]
    big_n = n_total[None, None, :]
    # hypergeometric pmf of y yes in a sample of m from N answers with Y yes (0 where m > N)
    logh = _log_comb(logfact, big_y, y) + _log_comb(logfact, big_n - big_y, m - y) - _log_comb(logfact, big_n, m)
    h = np.where(m <= big_n, np.exp(logh), 0.0)
    if weights is not None:
        h = h * np.asarray(weights, dtype=np.float64)[None, None, :]
    support = h.sum(axis=2)
    good_mass = (h * good[None, None, :]).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (good_mass + smoothing * prior) / (support + smoothing)
    p[np.arange(max_m + 1)[:, None] > np.arange(max_m + 1)[None, :]] = np.nan
    return p, support


class ConfidenceTable(Aggregator):
    """Per-group (synset) P(good | #yes, #no) calibrated on images with >= min_votes answers.

    fit(data, groups=None): `groups` maps task -> group (a Series indexed by task); None = one group.
    A group with no calibration images uses the table pooled over all groups; with no calibration images
    anywhere every probability is 0.5 (nothing is decided). Labels must be "yes"/"no".
    `smoothing` > 0 adds that many pseudo-images at the calibration base rate to every cell (ImageNet: 0);
    with ~100 calibration images per synset it keeps cells with little support from being 0 or 1, but
    also keeps high thresholds out of reach.
    """

    def __init__(self, min_votes: int = 10, smoothing: float = 0.0, accept_at: float = 0.99, reject_at: float = 0.01):
        if min_votes < 1:
            raise ValueError("min_votes must be >= 1")
        self.min_votes = min_votes
        self.smoothing = smoothing
        self.accept_at = accept_at
        self.reject_at = reject_at

    def fit(self, data: pd.DataFrame, groups: pd.Series | None = None) -> ConfidenceTable:
        enc = encode(data, (NO, YES)) if len(data) else empty_encoded()
        c = counts(enc.task, enc.label, enc.n_tasks, 2)
        n_yes, n_tot = c[:, 1].astype(np.int64), c.sum(axis=1).astype(np.int64)
        if groups is None:
            g = np.full(enc.n_tasks, ALL, dtype=object)
        else:
            g = groups.reindex(enc.tasks).to_numpy(dtype=object)
            if pd.isna(g).any():
                raise QCInputError(f"groups: no group for {int(pd.isna(g).sum())} task(s), e.g. "
                                   f"{list(enc.tasks[pd.isna(g)][:3])}; give every voted task its synset")
        calib = n_tot >= self.min_votes
        good = (n_yes * 2 > n_tot).astype(np.float64)  # majority of the calibration answers; a tie is "not good"
        max_m = int(max(n_tot.max(initial=0), self.min_votes))
        self.tables_: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        pooled = None
        if calib.any():
            pooled = build_table(n_yes[calib], n_tot[calib], good[calib], max_m, self.smoothing, good[calib].mean())
        p_task = np.full(enc.n_tasks, 0.5)
        for grp in pd.unique(g):
            in_g = g == grp
            sel = in_g & calib
            if sel.any():
                table = build_table(n_yes[sel], n_tot[sel], good[sel], max_m, self.smoothing, good[sel].mean())
            elif pooled is not None:
                table = pooled
            else:
                continue
            self.tables_[grp] = table
            p_task[in_g] = self._look(table[0], n_yes[in_g], n_tot[in_g])
        self.pooled_ = pooled
        self.max_m_ = max_m
        self.groups_ = pd.Series(g, index=enc.tasks, name="group")
        probas = np.column_stack([1.0 - p_task, p_task]) if enc.n_tasks else np.zeros((0, 2))
        self._set_results(enc, probas, worker_accuracy(enc, probas))
        self.n_yes_, self.n_votes_ = n_yes, n_tot
        return self

    @staticmethod
    def _look(p: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
        max_m = p.shape[0] - 1
        over = m > max_m  # more answers than any calibration image had: scale the counts down
        y = np.where(over, np.round(y * max_m / np.maximum(m, 1)).astype(np.int64), y)
        m = np.where(over, max_m, m)
        out = p[y, m]
        return np.where(np.isnan(out), 0.5, out)  # a (y, m) no calibration image can produce: undecided

    def lookup(self, n_yes: int, n_no: int, group: Any = ALL) -> float:
        """P(good | n_yes, n_no) in `group`'s table (the pooled table for an unknown group; 0.5 if none)."""
        table = self.tables_.get(group, self.pooled_)
        if table is None:
            return 0.5
        return float(self._look(table[0], np.array([n_yes]), np.array([n_yes + n_no]))[0])

    def table(self, group: Any = ALL) -> pd.DataFrame:
        """The table as rows (n_yes, n_no, p_good, support)."""
        p, s = self.tables_.get(group, self.pooled_) or (np.zeros((0, 0)), np.zeros((0, 0)))
        rows = [(y, m - y, p[y, m], s[y, m]) for m in range(p.shape[0]) for y in range(m + 1)]
        return pd.DataFrame(rows, columns=["n_yes", "n_no", "p_good", "support"])

    def decide(self) -> pd.Series:
        """accepted / rejected / pending per task under the thresholds."""
        p = self.probas_[YES].to_numpy()
        status = np.where(p >= self.accept_at, "accepted", np.where(p <= self.reject_at, "rejected", "pending"))
        return pd.Series(status, index=self.probas_.index, name="status")
