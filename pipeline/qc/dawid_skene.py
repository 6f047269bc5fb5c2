"""Dawid-Skene (1979): one confusion matrix per worker, EM over all answers, in numpy array operations.

Binary (yes/no) and multi-class are the same code: K labels, a (W, K, K) error tensor where
``errors[w, observed, true]`` is P(worker w answers `observed` | the truth is `true`). Each EM step is a
handful of ``np.bincount`` calls over the vote arrays (no pandas groupby), so one iteration on 10^6
votes takes milliseconds, and ``fit_stream`` runs the same EM over chunks read from disk for votes that
do not fit in memory (only the per-task posteriors and per-worker matrices stay resident).

The default settings reproduce crowd-kit's ``DawidSkene`` (majority-vote start, same M-step clipping,
same evidence-lower-bound stopping rule), so labels and posteriors agree with it; ``prior_strength`` > 0
adds Beta/Dirichlet pseudo-counts to every confusion matrix (MAP instead of ML), which keeps workers
with a handful of answers from getting extreme matrices; ``prior_matrix`` gives those pseudo-counts as a
(K, K) [observed, true] array instead (e.g. the crowd's own prior, `pipeline.qc.prior`), or one (K, K) per
worker as a (W, K, K) array, and ``class_prior`` holds the label shares fixed instead of re-estimating them.
A fit over one block of tasks while the rest of the crowd's tasks are held at their earlier posteriors (QC's
incremental rounds) passes the rest as counts: each worker's soft counts on the other tasks added to their
``prior_matrix``, and the other tasks' summed posteriors as ``class_counts``; it then reaches the same fixed
point a full fit would, given those posteriors.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"task": ["t1", "t1", "t1", "t2", "t2", "t2"], "worker": ["a", "b", "c"] * 2,
    ...                    "label": ["yes", "yes", "no", "no", "no", "yes"]})
    >>> ds = DawidSkene(n_iter=50).fit(df)
    >>> ds.labels_.to_dict()
    {'t1': 'yes', 't2': 'no'}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from pipeline.qc.base import Aggregator, Encoded, QCInputError, empty_encoded, encode, worker_accuracy

EPS = 1e-10  # crowd-kit's clip floor; keeps logs finite
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]
ChunkSource = Callable[[], Iterator[Chunk]]


def _log_softmax_rows(loglik: np.ndarray) -> np.ndarray:
    shifted = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class DawidSkene(Aggregator):
    """Dawid-Skene EM. ``fit(data, true_labels=None)``; ``fit_stream(source, ...)`` for chunked input.

    Attributes after fit: probas_ (task x label), labels_, priors_ (label), skills_ (expected accuracy per
    worker), errors_ (crowd-kit layout: index (worker, observed label), columns true label), n_iter_,
    loss_history_. Unknown workers in ``predict_proba`` carry no information (their answers are ignored).
    """

    def __init__(self, n_iter: int = 100, tol: float = 1e-5, prior_strength: float = 0.0,
                 prior_accuracy: float = 0.7, labels: Iterable[Any] | None = None, class_prior_strength: float = 0.0,
                 prior_matrix: np.ndarray | None = None, class_prior: Iterable[float] | None = None,
                 class_counts: Iterable[float] | None = None):
        if n_iter < 0:
            raise ValueError("n_iter must be >= 0")
        if not 0.0 < prior_accuracy < 1.0:
            raise ValueError("prior_accuracy must be strictly between 0 and 1")
        self.n_iter = n_iter
        self.tol = tol
        self.prior_strength = prior_strength
        self.prior_accuracy = prior_accuracy
        self.labels = labels
        self.class_prior_strength = class_prior_strength
        self.prior_matrix = prior_matrix
        self.class_prior = class_prior
        self.class_counts = class_counts

    # ----- the EM core on chunk sources (one chunk = the whole data set when in memory) -----
    def _pseudo(self, n_workers: int, k: int) -> np.ndarray | None:
        if self.prior_matrix is not None:
            m = np.asarray(self.prior_matrix, dtype=np.float64)
            if m.shape not in ((k, k), (n_workers, k, k)) or (m < 0).any():
                raise ValueError(f"prior_matrix must be a ({k}, {k}) or ({n_workers}, {k}, {k}) array of pseudo-counts "
                                 f">= 0, got shape {m.shape}")
            return np.broadcast_to(m, (n_workers, k, k))
        if self.prior_strength <= 0:
            return None
        off = (1.0 - self.prior_accuracy) / max(k - 1, 1)
        m = np.full((k, k), off)
        np.fill_diagonal(m, self.prior_accuracy)
        return np.broadcast_to(m * self.prior_strength, (n_workers, k, k))

    def _em(self, source: ChunkSource, n_tasks: int, n_workers: int, k: int,
            gold: tuple[np.ndarray, np.ndarray] | None) -> None:
        wk = n_workers * k
        # Majority-vote start, as crowd-kit does.
        cnt = np.zeros(n_tasks * k)
        n_votes = 0
        for t, _w, lab in source():
            cnt += np.bincount(t * k + lab, minlength=n_tasks * k)
            n_votes += len(t)
        cnt = cnt.reshape(n_tasks, k)
        probas = cnt / np.maximum(cnt.sum(axis=1, keepdims=True), 1.0)
        no_votes = cnt.sum(axis=1) == 0
        probas[no_votes] = 1.0 / k
        present = ~no_votes  # tasks without votes in this fit do not count toward the class shares
        probas = self._pin(probas, gold)
        pseudo = self._pseudo(n_workers, k)

        def m_step(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            num = np.zeros((k, wk))
            pt = np.ascontiguousarray(p.T)  # (k, T): each gather below reads one contiguous row
            for t, w, lab in source():
                wl = w * k + lab
                if k == 2:  # p0 = 1 - p1: one weighted bincount and one plain count
                    n_wl = np.bincount(wl, minlength=wk)
                    yes = np.bincount(wl, weights=pt[1][t], minlength=wk)
                    num[1] += yes
                    num[0] += n_wl - yes
                else:
                    for c in range(k):
                        num[c] += np.bincount(wl, weights=pt[c][t], minlength=wk)
            num3 = num.T.reshape(n_workers, k, k)
            err = num3 + pseudo if pseudo is not None else num3.copy()
            np.clip(err, EPS, None, out=err)
            err /= err.sum(axis=1, keepdims=True)  # normalise over the observed label, per true label
            return num3, err

        def e_step(err: np.ndarray, pri: np.ndarray) -> np.ndarray:
            logerr = np.ascontiguousarray(np.log(err).reshape(wk, k).T)  # (k, W*K)
            logpri = np.log(np.clip(pri, EPS, None))
            if k == 2:  # only the log-odds matter: one bincount per chunk
                diff = logerr[1] - logerr[0]
                lo = np.full(n_tasks, logpri[1] - logpri[0])
                for t, w, lab in source():
                    lo += np.bincount(t, weights=diff[w * k + lab], minlength=n_tasks)
                p1 = 1.0 / (1.0 + np.exp(-lo))
                return self._pin(np.column_stack([1.0 - p1, p1]), gold)
            loglik = np.tile(logpri, (n_tasks, 1))
            for t, w, lab in source():
                wl = w * k + lab
                for c in range(k):
                    loglik[:, c] += np.bincount(t, weights=logerr[c][wl], minlength=n_tasks)
            return self._pin(_log_softmax_rows(loglik), gold)

        priors = self._class_prior(probas, k, present)
        num, errors = m_step(probas)
        loss = -np.inf
        history: list[float] = []
        it = 0
        for it in range(1, self.n_iter + 1):  # noqa: B007 - `it` is reported after the loop
            probas = e_step(errors, priors)
            priors = self._class_prior(probas, k, present)
            num, errors = m_step(probas)
            # Evidence lower bound from the M-step sums (crowd-kit's formula, without another data pass).
            joint = float((num * np.log(errors)).sum() + num.sum(axis=(0, 1)) @ np.log(np.clip(priors, EPS, None)))
            pc = np.clip(probas, EPS, None)
            new_loss = (joint - float((pc * np.log(pc)).sum())) / max(n_votes, 1)
            history.append(new_loss)
            if new_loss - loss < self.tol:
                break
            loss = new_loss
        self.probas_array_ = probas
        self.priors_array_ = priors
        self.errors_array_ = errors
        self.counts_array_ = num  # (W, K, K) [observed, true] soft counts of the final posteriors, no pseudo-counts
        self.n_iter_ = it
        self.loss_history_ = history

    def _class_prior(self, probas: np.ndarray, k: int, present: np.ndarray | None = None) -> np.ndarray:
        """Mean posterior of the tasks with votes (`present`; default all) and of `class_counts`; with
        class_prior_strength > 0, that many pseudo-tasks per label are added, so a handful of all-yes tasks does
        not make every unseen task a certain yes."""
        if self.class_prior is not None:
            fixed = np.asarray(list(self.class_prior), dtype=np.float64)
            if fixed.shape != (k,) or (fixed < 0).any() or not np.isclose(fixed.sum(), 1.0):
                raise ValueError(f"class_prior must be {k} probabilities summing to 1, got {fixed.tolist()}")
            return fixed
        a = self.class_prior_strength
        if present is not None and not present.all():
            probas = probas[present]
        extra = np.zeros(k) if self.class_counts is None else np.asarray(list(self.class_counts), dtype=np.float64)
        if len(probas) == 0 and extra.sum() == 0:
            return np.full(k, 1.0 / k)
        return (probas.sum(axis=0) + extra + a) / (len(probas) + extra.sum() + a * k)

    @staticmethod
    def _pin(probas: np.ndarray, gold: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Known answers (gold tasks) override the posterior, so they teach the worker matrices."""
        if gold is not None and len(gold[0]):
            probas[gold[0]] = 0.0
            probas[gold[0], gold[1]] = 1.0
        return probas

    # ----- public API -----
    def fit(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> DawidSkene:
        """Fit on a long frame (task, worker, label); `true_labels` (Series task -> label) pins gold tasks."""
        enc = encode(data, self.labels) if len(data) else empty_encoded(self.labels or ("no", "yes"))
        self.encoded_ = enc
        gold = None
        if true_labels is not None and len(true_labels):
            ti = enc.tasks.get_indexer(true_labels.index)
            li = enc.labels.get_indexer(true_labels.to_numpy())
            if (li[ti >= 0] < 0).any():
                raise QCInputError(f"true_labels hold label(s) outside {list(enc.labels)}")
            keep = ti >= 0  # gold for tasks nobody answered teaches nothing
            gold = (ti[keep], li[keep])

        def source() -> Iterator[Chunk]:
            yield enc.task, enc.worker, enc.label

        self._em(source, enc.n_tasks, enc.n_workers, enc.n_labels, gold)
        self._set_results(enc, self.probas_array_, worker_accuracy(enc, self.probas_array_))
        self.priors_ = pd.Series(self.priors_array_, index=pd.Index(enc.labels, name="label"), name="prior")
        return self

    def fit_stream(self, source: ChunkSource, n_tasks: int, n_workers: int, n_labels: int = 2,
                   true_labels: tuple[np.ndarray, np.ndarray] | None = None) -> DawidSkene:
        """EM over integer-coded chunks: `source()` returns a fresh iterator of (task, worker, label) arrays.

        Memory is O(n_tasks * n_labels + n_workers * n_labels^2 + one chunk), whatever the number of votes.
        Results are numpy arrays: probas_array_, priors_array_, errors_array_.
        """
        def checked() -> Iterator[Chunk]:
            for t, w, lab in source():
                t, w, lab = np.asarray(t), np.asarray(w).astype(np.intp, copy=False), np.asarray(lab)
                if len(t) and (t.max() >= n_tasks or w.max() >= n_workers or lab.max() >= n_labels
                               or min(t.min(), w.min(), lab.min()) < 0):
                    raise QCInputError("a vote chunk holds a code outside [0, n_tasks/n_workers/n_labels); "
                                       "encode tasks, workers and labels before streaming")
                yield t, w, lab

        self._em(checked, n_tasks, n_workers, n_labels, true_labels)
        return self

    @property
    def errors_(self) -> pd.DataFrame:
        enc: Encoded = self.encoded_
        k = enc.n_labels
        idx = pd.MultiIndex.from_product([enc.workers, enc.labels], names=["worker", "label"])
        return pd.DataFrame(self.errors_array_.reshape(-1, k), index=idx, columns=pd.Index(enc.labels, name="label"))

    def predict_proba(self, data: pd.DataFrame) -> pd.DataFrame:
        """Posteriors for new answers with the fitted matrices; answers by unknown workers are ignored."""
        enc_fit: Encoded = self.encoded_
        enc = encode(data, enc_fit.labels) if len(data) else empty_encoded(enc_fit.labels)
        k = enc.n_labels
        widx = enc_fit.workers.get_indexer(enc.workers)[enc.worker]
        known = widx >= 0
        logerr = np.log(self.errors_array_)
        loglik = np.tile(np.log(np.clip(self.priors_array_, EPS, None)), (enc.n_tasks, 1))
        for c in range(k):
            w_ = logerr[widx[known], enc.label[known], c]
            loglik[:, c] += np.bincount(enc.task[known], weights=w_, minlength=enc.n_tasks)
        probas = _log_softmax_rows(loglik) if enc.n_tasks else np.zeros((0, k))
        return pd.DataFrame(probas, index=enc.tasks, columns=pd.Index(enc.labels, name="label"))

    def spammer_scores(self) -> pd.Series:
        """Raykar & Yu (2012) score per worker: 0 = answers independent of the truth (random or constant)."""
        return pd.Series(spammer_score(self.errors_array_), index=self.encoded_.workers, name="spammer_score")


def spammer_score(errors: np.ndarray) -> np.ndarray:
    """Binary: sensitivity + specificity - 1 (signed: < 0 means systematically wrong). K > 2: the mean
    distance of the confusion columns from their average (0 = every truth yields the same answers)."""
    k = errors.shape[1]
    if k == 2:
        return errors[:, 1, 1] + errors[:, 0, 0] - 1.0
    mean_col = errors.mean(axis=2, keepdims=True)
    return np.abs(errors - mean_col).sum(axis=1).mean(axis=1) / 2.0
