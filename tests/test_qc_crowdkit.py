"""Our Dawid-Skene against crowd-kit 1.4.2's on the same generated data: same labels, posteriors within 1e-6.

crowd-kit is a test/benchmark-only dependency in the project lock (requirements.txt).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from crowdkit.aggregation import DawidSkene as CrowdKitDawidSkene

from pipeline.qc.dawid_skene import DawidSkene


@pytest.mark.parametrize("k", [2, 3])
def test_dawid_skene_matches_crowdkit(k):
    rng = np.random.default_rng(11 + k)
    n, n_workers = 1500, 40
    truth = rng.integers(0, k, n)
    accuracy = rng.beta(6, 2, n_workers)
    task = np.repeat(np.arange(n), 5)
    worker = np.concatenate([rng.choice(n_workers, 5, replace=False) for _ in range(n)])
    correct = rng.random(len(task)) < accuracy[worker]
    label = np.where(correct, truth[task], (truth[task] + rng.integers(1, k, len(task))) % k)
    votes = pd.DataFrame({"task": task, "worker": worker, "label": label})

    theirs = CrowdKitDawidSkene(n_iter=100).fit(votes)
    ours = DawidSkene(n_iter=100, labels=list(range(k))).fit(votes)

    p_theirs = theirs.probas_.sort_index()[sorted(theirs.probas_.columns)].to_numpy()
    p_ours = ours.probas_.sort_index().to_numpy()
    assert np.abs(p_theirs - p_ours).max() < 1e-6
    assert (theirs.labels_.sort_index().to_numpy() == ours.labels_.sort_index().to_numpy().astype(int)).all()
    assert len(theirs.loss_history_) == ours.n_iter_
    assert (ours.labels_.sort_index().to_numpy().astype(int) == truth).mean() > 0.9  # and both are right
