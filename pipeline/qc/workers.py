"""Worker quality table and the rules that flag spammers and adversaries.

Signals per worker: answers and yes-rate; gold answers and their accuracy (tasks with a known answer);
and, from a binary Dawid-Skene fit, sensitivity P(yes | good), specificity P(no | bad) and the
Raykar-Yu score sensitivity + specificity - 1 (1 = perfect, 0 = answers carry no information, < 0 =
systematically wrong). The flags:

- ``always_yes`` / ``always_no``: answers one way whatever the image (sensitivity or specificity ~ 0);
- ``random``: score ~ 0 without being constant (a coin flipper);
- ``adversarial``: score clearly < 0 (mostly wrong, e.g. answering the opposite on purpose);
- ``gold_fail``: even the optimistic (Wilson upper) bound of the gold accuracy is under the minimum;
- ``low_accuracy``: honest but weak (estimated accuracy under ``min_accuracy``).

Every flagged worker should get no more tasks (the crowd stage blocks them); the answers of all but
``low_accuracy`` workers are also dropped from aggregation (``votes_used`` False), since they carry no
information (or misleading information) about the image.

Flags need evidence (``min_votes`` answers or ``min_gold`` gold answers), so a new worker is never
flagged on one unlucky answer.

    >>> import numpy as np
    >>> rules = FlagRules(min_votes=10)
    >>> sensitivity, specificity = np.array([1.0, 0.5, 0.1]), np.array([0.02, 0.5, 0.1])
    >>> flag_reasons(np.array([50, 50, 50]), sensitivity, specificity, np.array([0.98, 0.5, 0.5]),
    ...              np.array([0, 0, 0]), np.array([np.nan] * 3), rules)
    ['always_yes', 'random', 'adversarial']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.qc.base import Encoded

WORKER_COLUMNS = ["worker", "n_votes", "n_yes", "yes_rate", "gold_n", "gold_correct", "gold_accuracy",
                  "estimated_accuracy", "sensitivity", "specificity", "spammer_score", "flagged", "flag_reason", "votes_used"]
KEEP_VOTES = frozenset({None, "low_accuracy"})


@dataclass(frozen=True)
class FlagRules:
    min_votes: int = 20
    min_gold: int = 5
    random_score: float = 0.15  # |sens + spec - 1| below this: answers independent of the image
    adversarial_score: float = -0.2
    constant_rate: float = 0.1  # sensitivity or specificity below this with the other above 1 - it: constant
    gold_min_accuracy: float = 0.6
    min_accuracy: float = 0.0  # estimated accuracy below this (with min_votes answers): block, keep the votes


def wilson_upper(correct: np.ndarray, n: np.ndarray, z: float = 1.96) -> np.ndarray:
    """Upper end of the Wilson score interval for a proportion (1.0 where n == 0)."""
    n = np.asarray(n, dtype=np.float64)
    p = np.divide(correct, n, out=np.zeros_like(n), where=n > 0)
    denom = 1 + z * z / np.maximum(n, 1)
    centre = p + z * z / (2 * np.maximum(n, 1))
    spread = z * np.sqrt(p * (1 - p) / np.maximum(n, 1) + z * z / (4 * np.maximum(n, 1) ** 2))
    return np.where(n > 0, (centre + spread) / denom, 1.0)


def wilson_lower(correct: np.ndarray, n: np.ndarray, z: float = 1.96) -> np.ndarray:
    """Lower end of the Wilson interval (0.0 where n == 0)."""
    n = np.asarray(n, dtype=np.float64)
    upper_of_wrong = wilson_upper(n - np.asarray(correct, dtype=np.float64), n, z)
    return np.where(n > 0, 1.0 - upper_of_wrong, 0.0)


def gold_stats(enc: Encoded, gold_task: np.ndarray, gold_label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gold answers, correct gold answers) per worker."""
    truth = np.full(enc.n_tasks, -1)
    truth[gold_task] = gold_label
    vt = truth[enc.task]
    is_gold = vt >= 0
    gold_n = np.bincount(enc.worker[is_gold], minlength=enc.n_workers)
    gold_correct = np.bincount(enc.worker[is_gold], weights=(enc.label[is_gold] == vt[is_gold]), minlength=enc.n_workers)
    return gold_n, gold_correct


def confusion(enc: Encoded, probas: np.ndarray, pseudo: float = 1.0) -> np.ndarray:
    """(W, 2, 2) P(answer | truth) per worker from task posteriors, with `pseudo` counts per cell."""
    k = 2
    num = np.full((enc.n_workers * k, k), pseudo)
    wl = enc.worker * k + enc.label
    for c in range(k):
        num[:, c] += np.bincount(wl, weights=probas[enc.task, c], minlength=enc.n_workers * k)
    err = num.reshape(enc.n_workers, k, k)
    return err / err.sum(axis=1, keepdims=True)


def flag_reasons(n_votes: np.ndarray, sensitivity: np.ndarray, specificity: np.ndarray, yes_rate: np.ndarray,
                 gold_n: np.ndarray, gold_correct: np.ndarray, rules: FlagRules,
                 estimated_accuracy: np.ndarray | None = None) -> list[str | None]:
    """The first matching flag per worker, or None."""
    score = sensitivity + specificity - 1.0
    enough = n_votes >= rules.min_votes
    gold_correct = np.nan_to_num(gold_correct)
    gold_fail = (gold_n >= rules.min_gold) & (wilson_upper(gold_correct, gold_n) < rules.gold_min_accuracy)
    # proven good on the controls: the model's opinion (which a colluding majority can bend) does not flag them
    enough = enough & ~((gold_n >= rules.min_gold) & (wilson_lower(gold_correct, gold_n) >= rules.gold_min_accuracy))
    c = rules.constant_rate
    conditions = [
        ("always_yes", enough & (specificity < c) & (sensitivity > 1 - c)),
        ("always_no", enough & (sensitivity < c) & (specificity > 1 - c)),
        ("adversarial", enough & (score < rules.adversarial_score)),
        ("random", enough & (np.abs(score) < rules.random_score)),
        ("gold_fail", gold_fail),
    ]
    if estimated_accuracy is not None and rules.min_accuracy > 0:
        conditions.append(("low_accuracy", enough & (estimated_accuracy < rules.min_accuracy)))
    out: list[str | None] = [None] * len(n_votes)
    for name, cond in reversed(conditions):  # earlier rules win
        for i in np.flatnonzero(cond):
            out[i] = name
    return out


def worker_table(enc: Encoded, probas: np.ndarray, errors: np.ndarray, gold_task: np.ndarray,
                 gold_label: np.ndarray, rules: FlagRules) -> pd.DataFrame:
    """One row per worker in `enc` (binary labels, index 1 = yes).

    `probas` (task x 2) and `errors` (worker x 2 x 2) come from a Dawid-Skene fit on `enc`; gold_task /
    gold_label give the known answers (task codes and label codes).
    """
    w_n = enc.n_workers
    n_votes = np.bincount(enc.worker, minlength=w_n)
    n_yes = np.bincount(enc.worker, weights=(enc.label == 1), minlength=w_n)
    gold_n, gold_correct = gold_stats(enc, gold_task, gold_label)
    p_correct = probas[enc.task, enc.label] if len(enc.task) else np.zeros(0)
    est = np.bincount(enc.worker, weights=p_correct, minlength=w_n) / np.maximum(n_votes, 1)
    sens, spec = errors[:, 1, 1], errors[:, 0, 0]
    yes_rate = n_yes / np.maximum(n_votes, 1)
    reasons = flag_reasons(n_votes, sens, spec, yes_rate, gold_n, gold_correct, rules, est)
    with np.errstate(invalid="ignore", divide="ignore"):
        gold_acc = np.where(gold_n > 0, gold_correct / np.maximum(gold_n, 1), np.nan)
    return pd.DataFrame({
        "worker": np.asarray(enc.workers, dtype=object).astype(str), "n_votes": n_votes.astype(np.int64),
        "n_yes": n_yes.astype(np.int64), "yes_rate": yes_rate, "gold_n": gold_n.astype(np.int64),
        "gold_correct": gold_correct.astype(np.int64), "gold_accuracy": gold_acc, "estimated_accuracy": est,
        "sensitivity": sens, "specificity": spec, "spammer_score": sens + spec - 1.0,
        "flagged": np.array([r is not None for r in reasons], dtype=bool), "flag_reason": reasons,
        "votes_used": np.array([r in KEEP_VOTES for r in reasons], dtype=bool),
    }, columns=WORKER_COLUMNS)
