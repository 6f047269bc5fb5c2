"""QC I/O shell: votes + tasks from the store -> labels, workers, push_plan tables.

The pure work is `aggregate(votes, tasks, pairs, settings)`; `run_qc(store, settings)` reads, calls it and
writes. Same input tables -> same output tables (votes are de-duplicated and sorted before anything
else), so the crowd loop (pull -> aggregate -> push) can rerun this step at will.

Gold (control) pairs train the worker model and are left out of `labels` and `push_plan`: they are
known, and the crowd push adds them to batches itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.qc.adaptive import AdaptiveConsensus
from pipeline.qc.base import NO, YES, QCInputError, split_task_key, task_key
from pipeline.qc.workers import WORKER_COLUMNS, FlagRules

METHOD = "adaptive-ds"


def model_from_settings(qc: Any) -> AdaptiveConsensus:
    rules = FlagRules(min_votes=qc.min_votes_to_flag, min_gold=qc.min_gold_to_flag,
                      gold_min_accuracy=qc.gold_min_accuracy, min_accuracy=qc.block_below_accuracy)
    return AdaptiveConsensus(accept_at=qc.accept_at, reject_at=qc.reject_at, max_votes=qc.max_votes_per_image,
                             initial_votes=qc.initial_votes, max_batch=qc.max_batch,
                             budget_per_group=qc.budget_per_synset, prior_accuracy=qc.prior_accuracy,
                             prior_strength=qc.prior_strength, n_iter=qc.ds_max_iter, rules=rules)


def clean_votes(votes: pd.DataFrame) -> pd.DataFrame:
    """Check answers, drop repeated annotation ids, keep one (the latest) answer per worker and pair."""
    if votes.empty:
        return votes
    answer = votes["answer"].astype(str).str.strip().str.lower()
    bad = ~answer.isin([YES, NO])
    if bad.any():
        raise QCInputError(
            f"votes table: {int(bad.sum())} answer(s) other than 'yes'/'no' (annotation ids "
            f"{votes.loc[bad, 'annotation_id'].head(5).tolist()}, values {sorted(set(votes.loc[bad, 'answer'].astype(str)))[:5]}); "
            "fix the pull step's answer mapping and pull again; nothing was written")
    v = votes.assign(answer=answer).sort_values(["annotation_id", "submitted_at"], kind="stable")
    v = v.drop_duplicates(["annotation_id", "image_id"], keep="last")
    v = v.sort_values(["submitted_at", "annotation_id"], kind="stable")
    v = v.drop_duplicates(["image_id", "wnid", "worker"], keep="last")  # a worker who changed their answer
    return v.sort_values("annotation_id", kind="stable").reset_index(drop=True)


def gold_answers(tasks: pd.DataFrame) -> pd.Series:
    """task key -> yes/no for gold tasks."""
    if tasks.empty:
        return pd.Series(dtype=object)
    g = tasks[tasks["is_gold"].astype(bool) & tasks["gold_answer"].notna()]
    ans = g["gold_answer"].astype(str).str.strip().str.lower()
    bad = ~ans.isin([YES, NO])
    if bad.any():
        raise QCInputError(f"tasks table: gold_answer must be 'yes' or 'no'; task ids {g.loc[bad, 'task_id'].head(5).tolist()} "
                           f"have {sorted(set(g.loc[bad, 'gold_answer']))[:5]}; fix the gold set and rerun")
    s = pd.Series(ans.to_numpy(), index=task_key(g["image_id"], g["wnid"]).to_numpy())
    return s[~s.index.duplicated(keep="last")]


def aggregate(votes: pd.DataFrame, tasks: pd.DataFrame, pairs: pd.DataFrame | None, qc: Any
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, AdaptiveConsensus]:
    """Pure core: returns (labels, workers, push_plan, fitted model)."""
    votes = clean_votes(votes)
    gold = gold_answers(tasks)
    keys = task_key(votes["image_id"], votes["wnid"]) if len(votes) else pd.Series(dtype=str)
    long = pd.DataFrame({"task": keys.to_numpy(), "worker": votes["worker"].astype(str).to_numpy() if len(votes) else [],
                         "label": votes["answer"].to_numpy() if len(votes) else []})
    wanted = [keys]
    if len(tasks):
        t = tasks[~tasks["is_gold"].astype(bool)]
        wanted.append(task_key(t["image_id"], t["wnid"]))
    if pairs is not None and len(pairs):
        missing = [c for c in ("image_id", "wnid") if c not in pairs.columns]
        if missing:
            raise QCInputError(f"pairs: missing column(s) {missing}; give one row per (image_id, wnid) to decide")
        p = pairs.dropna(subset=["image_id", "wnid"])
        wanted.append(task_key(p["image_id"].astype(str), p["wnid"].astype(str)))
    all_keys = sorted(set(pd.concat([pd.Series(w, dtype=object) for w in wanted], ignore_index=True)))
    groups = pd.Series(split_task_key(pd.Index(all_keys))["wnid"].to_numpy(), index=all_keys, dtype=object)
    if len(gold):
        groups = pd.concat([groups, pd.Series(split_task_key(gold.index)["wnid"].to_numpy(), index=gold.index)])
        groups = groups[~groups.index.duplicated()]
    model = model_from_settings(qc).fit(long, true_labels=gold if len(gold) else None, tasks=all_keys, groups=groups)
    dec = model.decisions_.sort_index()
    ids = split_task_key(dec.index)
    labels = pd.DataFrame({"image_id": ids["image_id"], "wnid": ids["wnid"], "status": dec["status"].to_numpy(),
                           "n_votes": dec["n_votes"].to_numpy(np.int32), "n_yes": dec["n_yes"].to_numpy(np.int32),
                           "confidence": dec["p_yes"].to_numpy(np.float64), "method": METHOD,
                           # decided here, in dec's row order: sorting first would hand them to other pairs
                           "n_more": dec["n_more"].to_numpy(np.int32), "reason": dec["reason"].to_numpy()})
    labels = labels.sort_values(["wnid", "image_id"], kind="stable").reset_index(drop=True)
    plan = labels[labels["n_more"] > 0]
    labels = labels.drop(columns=["n_more", "reason"])
    push_plan = pd.DataFrame({"image_id": plan["image_id"], "wnid": plan["wnid"], "n_more": plan["n_more"],
                              "reason": plan["reason"], "n_votes": plan["n_votes"], "confidence": plan["confidence"]}
                             ).reset_index(drop=True)
    workers = model.workers_.sort_values("worker", kind="stable").reset_index(drop=True)[WORKER_COLUMNS]
    return labels, workers, push_plan, model


def pairs_to_verify(links: pd.DataFrame) -> pd.DataFrame:
    """(image_id, wnid) pairs the crowd must decide: the ingest stage's links, minus near duplicates of a kept image
    (voting on a copy would pay twice for one photo)."""
    if not len(links):
        return pd.DataFrame({"image_id": pd.Series(dtype=object), "wnid": pd.Series(dtype=object)})
    kept = links[links["near_duplicate_of"].isna()]
    return kept[["image_id", "wnid"]].drop_duplicates().reset_index(drop=True)


def without_controls(labels: pd.DataFrame, plan: pd.DataFrame, gold: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels and push plan without the pairs of the `gold` table: a control is known, whether or not it has been
    pushed as a gold task yet, so it is neither a label (nor, then, in a release) nor asked about as a candidate."""
    if not len(gold):
        return labels, plan
    held = set(task_key(gold["image_id"].astype(str), gold["wnid"].astype(str)))

    def drop(frame: pd.DataFrame) -> pd.DataFrame:
        if frame.empty:
            return frame
        return frame[~task_key(frame["image_id"].astype(str), frame["wnid"].astype(str)).isin(held)].reset_index(drop=True)

    return drop(labels), drop(plan)


def run_qc(store: Any, settings: Any, pairs: pd.DataFrame | None = None) -> dict[str, Any]:
    """Read votes/tasks, aggregate, write labels, workers and push_plan; returns a summary dict."""
    votes = store.read_table("votes", missing_ok=True).to_pandas()
    tasks = store.read_table("tasks", missing_ok=True).to_pandas()
    if pairs is None:
        pairs = pairs_to_verify(store.read_table("image_links", missing_ok=True).to_pandas())
    labels, workers, plan, model = aggregate(votes, tasks, pairs, settings.qc)
    labels, plan = without_controls(labels, plan, store.read_table("gold", missing_ok=True).to_pandas())
    store.write_table("labels", labels)
    store.write_table("workers", workers)
    store.write_table("push_plan", plan)
    precision = model.precision_.rename(columns={"group": "wnid"})
    return {
        "votes": int(len(votes)), "pairs": int(len(labels)),
        "accepted": int((labels["status"] == "accepted").sum()), "rejected": int((labels["status"] == "rejected").sum()),
        "pending": int((labels["status"] == "pending").sum()), "workers": int(len(workers)),
        "flagged_workers": int(workers["flagged"].sum()), "push_pairs": int(len(plan)),
        "push_votes": int(plan["n_more"].sum()), "per_synset": precision.to_dict("records"),
    }
