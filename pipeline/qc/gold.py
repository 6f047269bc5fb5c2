"""Gold-based worker filtering: drop workers who fail the known answers, then aggregate the rest.

This is the control-question scheme ImageNetV2 used (3 known positives + 3 known negatives per HIT):
a worker whose gold accuracy is confidently below `min_accuracy` (Wilson upper bound) is removed, the
remaining answers are aggregated by majority vote. Workers with fewer than `min_gold` gold answers keep
their votes (no evidence against them yet).

    >>> import pandas as pd
    >>> votes = pd.DataFrame({"task": ["g1", "g2", "g3", "g4", "g5", "t"] * 2 + ["t"],
    ...                       "worker": ["bad"] * 6 + ["ok"] * 6 + ["ok2"],
    ...                       "label": ["no"] * 5 + ["no"] + ["yes"] * 5 + ["yes"] + ["yes"]})
    >>> gold = pd.Series(["yes"] * 5, index=["g1", "g2", "g3", "g4", "g5"])
    >>> gf = GoldFilter(min_gold=5).fit(votes, gold)
    >>> list(gf.excluded_), gf.labels_["t"]
    (['bad'], 'yes')
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.qc.base import Aggregator, check_long
from pipeline.qc.majority import MajorityVote
from pipeline.qc.workers import wilson_upper


class GoldFilter(Aggregator):
    """Exclude workers failing gold, then majority vote. skills_ = gold accuracy (NaN without gold)."""

    def __init__(self, min_gold: int = 5, min_accuracy: float = 0.6, inner: Aggregator | None = None):
        self.min_gold = min_gold
        self.min_accuracy = min_accuracy
        self.inner = inner or MajorityVote()

    def fit(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> GoldFilter:
        data = check_long(data)
        truth = data["task"].map(true_labels) if true_labels is not None and len(true_labels) else pd.Series(
            np.nan, index=data.index, dtype=object)
        has = truth.notna()
        per = pd.DataFrame({"worker": data["worker"][has], "ok": (data["label"][has] == truth[has])})
        stats = per.groupby("worker")["ok"].agg(["sum", "count"])
        upper = wilson_upper(stats["sum"].to_numpy(float), stats["count"].to_numpy(float))
        bad = stats.index[(stats["count"].to_numpy() >= self.min_gold) & (upper < self.min_accuracy)]
        self.excluded_ = pd.Index(sorted(bad), name="worker")
        self.inner.fit(data[~data["worker"].isin(bad)])
        self.probas_ = self.inner.probas_
        self.labels_ = self.inner.labels_
        workers = pd.Index(pd.unique(data["worker"]), name="worker")
        self.skills_ = (stats["sum"] / stats["count"]).reindex(workers).rename("skill").astype(float)
        return self
