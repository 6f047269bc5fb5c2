"""Majority vote: each answer counts once; the baseline every other method must beat.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"task": ["t1"] * 3 + ["t2"] * 2, "worker": ["a", "b", "c", "a", "b"],
    ...                    "label": ["yes", "yes", "no", "yes", "no"]})
    >>> mv = MajorityVote().fit(df)
    >>> mv.labels_.to_dict()   # t2 is a tie: it goes to the first label in sorted order, "no"
    {'t1': 'yes', 't2': 'no'}
    >>> round(float(mv.probas_.loc["t1", "yes"]), 3)
    0.667
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from pipeline.qc.base import Aggregator, counts, empty_encoded, encode, worker_accuracy


class MajorityVote(Aggregator):
    """Share of answers per label is the probability; skills are agreement with the majority label."""

    def __init__(self, labels: Iterable[Any] | None = None):
        self.labels = labels

    def fit(self, data: pd.DataFrame) -> MajorityVote:
        enc = encode(data, self.labels) if len(data) else empty_encoded(self.labels or ("no", "yes"))
        c = counts(enc.task, enc.label, enc.n_tasks, enc.n_labels)
        probas = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
        onehot = np.zeros_like(probas)
        if len(probas):
            onehot[np.arange(len(probas)), np.argmax(probas, axis=1)] = 1.0
        self._set_results(enc, probas, worker_accuracy(enc, onehot))
        return self
