"""Gold controls: choosing them, and per-worker accuracy on them.

Workers below `gold_min_accuracy` after at least `gold_min_n` gold answers are flagged: QC drops their
votes (it reads the `worker_gold` table) and `crowd.simulate`/routing stop giving them tasks.

    >>> import pandas as pd
    >>> votes = pd.DataFrame({"worker": ["a", "a", "b", "b"], "is_gold": [True] * 4, "task_id": [1, 2, 1, 2],
    ...                       "answer": ["yes", "no", "no", "no"]})
    >>> tasks = pd.DataFrame({"task_id": [1, 2], "gold_answer": ["yes", "no"]})
    >>> worker_gold(votes, tasks, min_n=2, min_accuracy=0.7)[["worker", "gold_accuracy", "flagged"]].values.tolist()
    [['a', 1.0, False], ['b', 0.5, True]]
"""

from __future__ import annotations

import pandas as pd

COLUMNS = ["worker", "n_votes", "gold_n", "gold_correct", "gold_accuracy", "yes_rate", "flagged", "flag_reason"]


def gold_from_labels(labels: pd.DataFrame, min_confidence: float = 0.999, per_wnid: int = 20) -> pd.DataFrame:
    """Known positives and negatives taken from QC labels decided with very high confidence."""
    if labels.empty:
        return pd.DataFrame(columns=["image_id", "wnid", "answer", "source"])
    lab = labels[labels["status"].isin(["accepted", "rejected"])].copy()
    conf = lab["confidence"].fillna(0.0)
    lab = lab[(conf >= min_confidence) | (conf <= 1 - min_confidence)]
    lab["answer"] = lab["status"].map({"accepted": "yes", "rejected": "no"})
    lab = lab.sort_values(["wnid", "answer", "image_id"]).groupby(["wnid", "answer"]).head(per_wnid)
    lab["source"] = "labels"
    return lab[["image_id", "wnid", "answer", "source"]].reset_index(drop=True)


def worker_gold(votes: pd.DataFrame, tasks: pd.DataFrame, *, min_n: int, min_accuracy: float) -> pd.DataFrame:
    """One row per worker: votes, gold answers, gold accuracy, share of yes, flagged with reason."""
    if votes.empty:
        return pd.DataFrame(columns=COLUMNS)
    # A grid task holds several images, each with its own gold answer: match on (task, image) when both say.
    on = ["task_id", "image_id"] if "image_id" in votes.columns and "image_id" in tasks.columns else ["task_id"]
    v = votes[["worker", "answer", "is_gold", *on]].copy()
    g = v[v["is_gold"].astype(bool)].merge(tasks[[*on, "gold_answer"]], on=on, how="inner")
    g = g[g["gold_answer"].notna()]
    g["correct"] = g["answer"] == g["gold_answer"]
    per = v.groupby("worker").agg(n_votes=("task_id", "size"), yes_rate=("answer", lambda s: float((s == "yes").mean())))
    gold = g.groupby("worker").agg(gold_n=("correct", "size"), gold_correct=("correct", "sum"))
    out = per.join(gold, how="left").fillna({"gold_n": 0, "gold_correct": 0}).reset_index()
    out["gold_n"] = out["gold_n"].astype("int64")
    out["gold_correct"] = out["gold_correct"].astype("int64")
    out["gold_accuracy"] = (out["gold_correct"] / out["gold_n"]).where(out["gold_n"] > 0)
    low = (out["gold_n"] >= min_n) & (out["gold_accuracy"] < min_accuracy)
    out["flagged"] = low
    out["flag_reason"] = None
    out.loc[low, "flag_reason"] = [f"gold accuracy {a:.2f} < {min_accuracy} on {n} controls"
                                   for a, n in zip(out.loc[low, "gold_accuracy"], out.loc[low, "gold_n"], strict=True)]
    return out[COLUMNS].sort_values("worker").reset_index(drop=True)
