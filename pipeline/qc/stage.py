"""QC I/O shell: votes + tasks from the store -> labels, workers, push_plan tables.

The pure work is `aggregate(votes, tasks, pairs, settings)`; `run_qc(store, settings)` reads, calls it and
writes. Same input tables -> same output tables (votes are de-duplicated and sorted before anything
else), so the crowd loop (pull -> aggregate -> push) can rerun this step at will.

The method (`qc.method`, `synsetforge qc --method`, the crowd DAG's `qc_method` Param) decides how votes become
labels and what the push plan asks for; `labels.method` records it:

- ``adaptive-ds`` (default): `AdaptiveConsensus`, a worker-aware posterior with flagged workers' votes left
  out; accept / reject at `accept_at` / `reject_at`, otherwise ask the votes still missing (at most
  `max_votes_per_image`).
- ``ds`` and ``mv``: a fixed overlap, as ImageNetV2 ran it: every image is asked for `max_votes_per_image`
  votes (`max_batch` at a time), then Dawid-Skene (`DawidSkene`, with the `prior_accuracy` pseudo-answers) or
  majority vote (`MajorityVote`) decides: accepted if it says yes, rejected if no, pending on an exact tie.
- ``confidence-table``: ImageNet's scheme (`ConfidenceTable`): a calibration share (`calibration_share`,
  at least one image) of each synset, picked by a hash of the pair, is asked for `max_votes_per_image` votes;
  its table P(good | #yes, #no) then decides the other images, which get `initial_votes` and then one vote
  at a time until the table passes `accept_at` / `reject_at` or they reach `max_votes_per_image` (pending).
  Until any synset has a table, images that have their first votes wait (reason "calibrating").

For ds, mv and confidence-table the votes of workers who fail the gold controls are left out first
(`GoldFilter`: at least `min_gold_to_flag` gold answers and a Wilson upper bound under `gold_min_accuracy`).
Every method writes the same `workers` table (the adaptive model's flags, which the crowd side uses to stop
routing tasks) and respects `budget_per_synset`.

Gold (control) pairs train the worker model and are left out of `labels` and `push_plan`: they are
known, and the crowd push adds them to batches itself. Until any control has been answered, QC judges
workers by their agreement alone, and the summary says so (`gold`, `gold_note`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd

from pipeline.qc.adaptive import DECISION_COLUMNS, AdaptiveConsensus, apply_budget, group_precision
from pipeline.qc.base import NO, YES, Aggregator, QCInputError, split_task_key, task_key
from pipeline.qc.confidence_table import ConfidenceTable
from pipeline.qc.dawid_skene import DawidSkene
from pipeline.qc.gold import GoldFilter
from pipeline.qc.majority import MajorityVote
from pipeline.qc.team import apply_team
from pipeline.qc.workers import WORKER_COLUMNS, FlagRules

METHOD = "adaptive-ds"
METHODS = ("adaptive-ds", "ds", "mv", "confidence-table")
NO_GOLD_NOTE = "no gold controls yet: workers are judged by agreement only"


def model_from_settings(qc: Any) -> AdaptiveConsensus:
    rules = FlagRules(min_votes=qc.min_votes_to_flag, min_gold=qc.min_gold_to_flag,
                      gold_min_accuracy=qc.gold_min_accuracy, min_accuracy=qc.block_below_accuracy)
    return AdaptiveConsensus(accept_at=qc.accept_at, reject_at=qc.reject_at, max_votes=qc.max_votes_per_image,
                             initial_votes=qc.initial_votes, max_batch=qc.max_batch,
                             budget_per_group=qc.budget_per_synset, prior_accuracy=qc.prior_accuracy,
                             prior_strength=qc.prior_strength, n_iter=qc.ds_max_iter, rules=rules,
                             calibrated=getattr(qc, "calibrated", True))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise QCInputError(f"QC method {method!r} is not one of {', '.join(METHODS)}; set qc.method "
                           "(or synsetforge qc --method) to one of them")
    return method


def calibration_subset(tasks: pd.Index, groups: pd.Series, share: float) -> np.ndarray:
    """True for the tasks of each group whose hash falls under `share`, and for each group's lowest-hash task
    (so every synset calibrates). A hash of the task key, so the subset does not move when images are added
    (bar a new lowest-hash image, which only adds one)."""
    if not len(tasks):
        return np.zeros(0, dtype=bool)
    u = np.array([int.from_bytes(hashlib.sha256(str(t).encode()).digest()[:8], "big") / 2.0 ** 64 for t in tasks])
    grp = groups.reindex(tasks).to_numpy(dtype=object)
    first = pd.Series(u).groupby(pd.Series(grp).astype(str).to_numpy()).transform("min").to_numpy()
    return (u < share) | (u == first)


def method_decisions(method: str, long: pd.DataFrame, gold: pd.Series, base: pd.DataFrame, groups: pd.Series,
                     qc: Any) -> tuple[pd.DataFrame, Aggregator]:
    """Decisions (DECISION_COLUMNS, one row per task of `base`, the adaptive model's decisions) by ds, mv or
    confidence-table, and the fitted method (see the module docstring for what each asks for)."""
    gf = GoldFilter(min_gold=qc.min_gold_to_flag, min_accuracy=qc.gold_min_accuracy)
    excluded = gf.fit(long, gold if len(gold) else None).excluded_ if len(long) else pd.Index([])
    used = long[~long["worker"].isin(excluded)]
    idx = base.index
    n_votes = base["n_votes"].to_numpy(np.int64)
    n_used = used.groupby("task").size().reindex(idx, fill_value=0).to_numpy(np.int64)
    target = qc.max_votes_per_image
    if method == "mv":
        model: Aggregator = MajorityVote(labels=(NO, YES)).fit(used)
    elif method == "ds":
        model = DawidSkene(n_iter=qc.ds_max_iter, tol=1e-6, prior_strength=qc.prior_strength,
                           prior_accuracy=qc.prior_accuracy, labels=(NO, YES), class_prior_strength=2.0
                           ).fit(used, true_labels=gold if len(gold) else None)
    else:  # controls stay out of the table: they may hold far more answers than any image, and are known
        model = ConfidenceTable(min_votes=target, accept_at=qc.accept_at, reject_at=qc.reject_at).fit(
            used[~used["task"].isin(gold.index)], groups=groups)
    p = model.probas_[YES].reindex(idx).fillna(0.5).to_numpy() if len(idx) else np.zeros(0)
    p = np.where(n_used > 0, p, 0.5)
    full = n_votes >= target
    if method in ("mv", "ds"):
        decided = full & (n_used > 0) & (p != 0.5)
        status = np.where(decided, np.where(p > 0.5, "accepted", "rejected"), "pending")
        n_more = np.where(full, 0, target - n_votes)
        reason = np.where(decided, "decided", np.where(full, "cap", np.where(n_votes == 0, "new", "fixed")))
    else:
        calib = calibration_subset(idx, groups, qc.calibration_share)
        has_table = bool(getattr(model, "tables_", {}))
        ready = ~calib | full  # a calibration image decides once it has all its votes
        decided = ready & (n_used > 0) & ((p >= qc.accept_at) | (p <= qc.reject_at))
        status = np.where(decided, np.where(p >= qc.accept_at, "accepted", "rejected"), "pending")
        waiting = np.full(len(idx), not has_table)
        reason = np.select([decided, full, calib, n_votes == 0, waiting],
                           ["decided", "cap", "calibration", "new", "calibrating"], "uncertain").astype(object)
        n_more = np.select([reason == "calibration", reason == "new", reason == "uncertain"],
                           [target - n_votes, np.minimum(qc.initial_votes, target - n_votes), np.ones_like(n_votes)],
                           0)
    if qc.max_batch:
        n_more = np.minimum(n_more, qc.max_batch)
    dec = pd.DataFrame({"group": base["group"].to_numpy(), "n_votes": n_votes, "n_yes": base["n_yes"].to_numpy(),
                        "n_used": n_used, "p_yes": p, "status": status, "n_more": n_more.astype(np.int64),
                        "reason": reason}, index=idx, columns=DECISION_COLUMNS)
    if qc.budget_per_synset is not None:
        dec = apply_budget(dec, qc.budget_per_synset)
    return dec, model


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


def aggregate(votes: pd.DataFrame, tasks: pd.DataFrame, pairs: pd.DataFrame | None, qc: Any,
              method: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Aggregator]:
    """Pure core: returns (labels, workers, push_plan, fitted method). `method` overrides `qc.method`."""
    method = check_method(method or getattr(qc, "method", METHOD))
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
    fitted: Aggregator = model
    dec = model.decisions_
    if method != "adaptive-ds":
        dec, fitted = method_decisions(method, long, gold, dec, groups, qc)
    dec = dec.sort_index()
    ids = split_task_key(dec.index)
    labels = pd.DataFrame({"image_id": ids["image_id"], "wnid": ids["wnid"], "status": dec["status"].to_numpy(),
                           "n_votes": dec["n_votes"].to_numpy(np.int32), "n_yes": dec["n_yes"].to_numpy(np.int32),
                           "confidence": dec["p_yes"].to_numpy(np.float64), "method": method,
                           # decided here, in dec's row order: sorting first would hand them to other pairs
                           "n_more": dec["n_more"].to_numpy(np.int32), "reason": dec["reason"].to_numpy()})
    labels = labels.sort_values(["wnid", "image_id"], kind="stable").reset_index(drop=True)
    plan = labels[labels["n_more"] > 0]
    labels = labels.drop(columns=["n_more", "reason"])
    push_plan = pd.DataFrame({"image_id": plan["image_id"], "wnid": plan["wnid"], "n_more": plan["n_more"],
                              "reason": plan["reason"], "n_votes": plan["n_votes"], "confidence": plan["confidence"]}
                             ).reset_index(drop=True)
    workers = model.workers_.sort_values("worker", kind="stable").reset_index(drop=True)[WORKER_COLUMNS]
    return labels, workers, push_plan, fitted


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


def gold_summary(votes: pd.DataFrame, tasks: pd.DataFrame, gold_table: pd.DataFrame) -> dict[str, Any]:
    """How many controls QC could judge workers on: answered gold tasks (`gold`), their votes, the rows of the
    `gold` table, and a sentence for people (`gold_note`)."""
    gold = gold_answers(tasks)
    v = clean_votes(votes)
    keys = task_key(v["image_id"], v["wnid"]) if len(v) else pd.Series(dtype=object)
    answered = keys.isin(gold.index) if len(gold) else pd.Series(False, index=keys.index)
    n_gold, n_votes = int(keys[answered].nunique()), int(answered.sum())
    if n_gold:
        note = f"{n_gold} gold control(s) answered ({n_votes} vote(s)): workers are also judged on known answers"
    elif len(gold_table):
        note = f"{NO_GOLD_NOTE} (the gold table holds {len(gold_table)} control(s), none answered yet)"
    else:
        note = f"{NO_GOLD_NOTE} (no gold table: `synsetforge crowd gold --refresh` builds one)"
    return {"gold": n_gold, "gold_votes": n_votes, "gold_table": int(len(gold_table)), "gold_note": note}


def run_qc(store: Any, settings: Any, pairs: pd.DataFrame | None = None, method: str | None = None) -> dict[str, Any]:
    """Read votes/tasks, aggregate, write labels, workers and push_plan; returns a summary dict. `method`
    overrides `settings.qc.method`."""
    method = check_method(method or settings.qc.method)
    votes = store.read_table("votes", missing_ok=True).to_pandas()
    tasks = store.read_table("tasks", missing_ok=True).to_pandas()
    if pairs is None:
        pairs = pairs_to_verify(store.read_table("image_links", missing_ok=True).to_pandas())
    labels, workers, plan, _ = aggregate(votes, tasks, pairs, settings.qc, method=method)
    gold_table = store.read_table("gold", missing_ok=True).to_pandas()
    labels, plan = without_controls(labels, plan, gold_table)
    labels, plan, team = apply_team(labels, plan, votes, workers, settings.qc)  # the team's limits: pipeline.qc.team
    store.write_table("labels", labels)
    store.write_table("workers", workers)
    store.write_table("push_plan", plan)
    precision = group_precision(labels.rename(columns={"wnid": "group", "confidence": "p_yes"})).rename(
        columns={"group": "wnid"})
    return {
        "method": method, "votes": int(len(votes)), "pairs": int(len(labels)),
        "accepted": int((labels["status"] == "accepted").sum()), "rejected": int((labels["status"] == "rejected").sum()),
        "pending": int((labels["status"] == "pending").sum()), "workers": int(len(workers)),
        "flagged_workers": int(workers["flagged"].sum()), "push_pairs": int(len(plan)),
        "push_votes": int(plan["n_more"].sum()), **gold_summary(votes, tasks, gold_table),
        "per_synset": precision.to_dict("records"),
        **team,  # last: its push_pairs / push_votes count only the rows that ask for votes (n_more > 0)
    }
