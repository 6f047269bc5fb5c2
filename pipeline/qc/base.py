"""The one data shape every QC method uses, and the integer encoding the numpy cores work on.

A *long frame* has one row per answer: ``task``, ``worker``, ``label`` (crowd-kit's shape). For the
verification stage a task is one (image_id, wnid) pair; ``task_key`` / ``split_task_key`` convert.
Methods follow crowd-kit's interface: ``fit(data)``, ``fit_predict(data) -> Series`` (label per task),
``fit_predict_proba(data) -> DataFrame`` (task x label), and ``skills_`` (estimated accuracy per worker).

    >>> import pandas as pd
    >>> enc = encode(pd.DataFrame({"task": ["a", "a", "b"], "worker": ["w1", "w2", "w1"], "label": ["yes", "no", "yes"]}))
    >>> enc.task.tolist(), enc.worker.tolist(), enc.label.tolist(), list(enc.labels)
    ([0, 0, 1], [0, 1, 0], [1, 0, 1], ['no', 'yes'])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError

LONG_COLUMNS = ("task", "worker", "label")
YES, NO = "yes", "no"
BINARY_LABELS = (NO, YES)  # sorted order: index 0 = no, 1 = yes; a tie resolves to index 0 ("no"), the safe side
SEP = "|"


class QCInputError(UserError):
    """The votes given to a QC method are malformed; the message says which rows and what to do."""


@dataclass(frozen=True)
class Encoded:
    """Integer codes for a long frame: task/worker/label are row-aligned int arrays indexing the three Indexes."""

    task: np.ndarray
    worker: np.ndarray
    label: np.ndarray
    tasks: pd.Index
    workers: pd.Index
    labels: pd.Index

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def n_labels(self) -> int:
        return len(self.labels)


def check_long(data: pd.DataFrame, name: str = "votes") -> pd.DataFrame:
    """Return the task/worker/label columns of `data`, refusing missing columns and null cells."""
    if not isinstance(data, pd.DataFrame):
        raise QCInputError(f"{name}: expected a pandas DataFrame with columns task, worker, label, got {type(data)}")
    missing = [c for c in LONG_COLUMNS if c not in data.columns]
    if missing:
        raise QCInputError(f"{name}: missing column(s) {missing}; a QC input has one row per answer: task, worker, label")
    out = data[list(LONG_COLUMNS)]
    nulls = out.isna().any(axis=1)
    if nulls.any():
        raise QCInputError(
            f"{name}: {int(nulls.sum())} row(s) with an empty task, worker or label "
            f"(first: {out[nulls].head(3).to_dict('records')}); drop or fix them and rerun"
        )
    return out


def encode(data: pd.DataFrame, labels: Iterable[Any] | None = None, name: str = "votes") -> Encoded:
    """Factorize a long frame. Tasks/workers keep first-seen order; labels are sorted (or the given order)."""
    data = check_long(data, name)
    t_codes, tasks = pd.factorize(data["task"], sort=False)
    w_codes, workers = pd.factorize(data["worker"], sort=False)
    if labels is None:
        label_index = pd.Index(sorted(pd.unique(data["label"])))
    else:
        label_index = pd.Index(list(labels))
    l_codes = label_index.get_indexer(data["label"])
    if (l_codes < 0).any():
        bad = pd.unique(data["label"][l_codes < 0])[:5]
        raise QCInputError(f"{name}: label(s) {list(bad)} not among the known labels {list(label_index)}")
    return Encoded(
        task=t_codes.astype(np.int64), worker=w_codes.astype(np.int64), label=l_codes.astype(np.int64),
        tasks=pd.Index(tasks, name="task"), workers=pd.Index(workers, name="worker"), labels=label_index,
    )


def counts(task: np.ndarray, label: np.ndarray, n_tasks: int, n_labels: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(n_tasks, n_labels) matrix of (weighted) answers per task and label, by one bincount."""
    flat = np.bincount(task * n_labels + label, weights=weights, minlength=n_tasks * n_labels)
    return flat.reshape(n_tasks, n_labels).astype(np.float64)


def argmax_labels(probas: np.ndarray) -> np.ndarray:
    """Most probable label per row; an exact tie goes to the lowest index (for yes/no: "no")."""
    return np.argmax(probas, axis=1)


def task_key(image_id: pd.Series | str, wnid: pd.Series | str) -> Any:
    """One string per (image, wnid) pair; image ids are hex digests and wnids n+8 digits, so "|" is safe."""
    return image_id + SEP + wnid


def split_task_key(keys: pd.Series | pd.Index) -> pd.DataFrame:
    parts = pd.Series(keys, dtype="string").str.split(SEP, n=1, expand=True)
    if parts.shape[1] != 2:
        parts = pd.DataFrame({0: pd.Series(dtype="string"), 1: pd.Series(dtype="string")})
    return pd.DataFrame({"image_id": parts[0].astype(str).to_numpy(), "wnid": parts[1].astype(str).to_numpy()})


class Aggregator:
    """Base class: subclasses implement `fit`, setting probas_ (task x label), labels_ and skills_."""

    probas_: pd.DataFrame
    labels_: pd.Series
    skills_: pd.Series

    def fit(self, data: pd.DataFrame) -> Aggregator:  # pragma: no cover - interface
        raise NotImplementedError

    def fit_predict(self, data: pd.DataFrame, **kwargs: Any) -> pd.Series:
        return self.fit(data, **kwargs).labels_

    def fit_predict_proba(self, data: pd.DataFrame, **kwargs: Any) -> pd.DataFrame:
        return self.fit(data, **kwargs).probas_

    def _set_results(self, enc: Encoded, probas: np.ndarray, skills: np.ndarray) -> None:
        self.probas_ = pd.DataFrame(probas, index=enc.tasks, columns=pd.Index(enc.labels, name="label"))
        idx = argmax_labels(probas) if len(probas) else np.zeros(0, dtype=np.int64)
        self.labels_ = pd.Series(np.asarray(enc.labels)[idx] if len(idx) else [], index=enc.tasks, name="agg_label",
                                 dtype=object)
        self.skills_ = pd.Series(skills, index=enc.workers, name="skill", dtype=np.float64)


def empty_encoded(labels: Iterable[Any] = BINARY_LABELS) -> Encoded:
    z = np.zeros(0, dtype=np.int64)
    return Encoded(z, z, z, pd.Index([], name="task"), pd.Index([], name="worker"), pd.Index(list(labels)))


def worker_accuracy(enc: Encoded, probas: np.ndarray) -> np.ndarray:
    """Expected share of each worker's answers that are correct, under the task posteriors."""
    if enc.n_workers == 0:
        return np.zeros(0)
    p_correct = probas[enc.task, enc.label]
    n = np.bincount(enc.worker, minlength=enc.n_workers)
    return np.bincount(enc.worker, weights=p_correct, minlength=enc.n_workers) / np.maximum(n, 1)
