"""A QC loop that knows its team: the push plan never asks a pair for more votes than the team can still give, a
pair nobody left can vote on says so, and the votes QC ignores are counted apart.

Why: the open-source Label Studio gives a task to whoever asks next, and a pair pushed again can reach someone who
has already answered it; QC counts one vote per worker and pair (the latest, `stage.clean_votes`). With a team of
two, a plan asking a pair for a third vote buys only a repeat, and a loop waiting for it never settles.

The active team (`active_team`) is `qc.team` (worker pseudonyms) when it is set; otherwise every worker with a vote
submitted within `qc.active_days` of the newest vote in the table (the newest vote, not the clock, so the same
tables always give the same plan). Workers QC flags are left out: they are blocked, or their votes do not count.
Until anyone has voted (and with no `qc.team`) the team is unknown and the plan is left as QC made it.

`apply_team` then works on QC's labels and push plan, pair by pair:

- available = active, unflagged annotators who have not voted on the pair; n_more = min(n_more, available);
- a pair with no one available needs a new annotator. With `qc.small_team_decide` (the default) it is decided from
  its posterior at the lower small-team bar, `qc.small_team_accept_at` / `qc.small_team_reject_at`, when at least
  one vote QC uses stands behind it; its `labels.method` is then ``<method>/small-team``, so a release says which of
  its labels were decided that way. Otherwise (the setting off, a posterior between the bars, or no usable vote) it
  stays pending and stays in the plan with n_more 0 and reason ``needs_new_annotator`` (the crowd push skips rows
  with n_more 0).

    >>> import pandas as pd
    >>> from types import SimpleNamespace
    >>> qc = SimpleNamespace(team=["w-a", "w-b"], active_days=14.0, small_team_decide=True,
    ...                      small_team_accept_at=0.9, small_team_reject_at=0.25)
    >>> votes = pd.DataFrame({"annotation_id": [1, 2, 3], "task_id": [1, 1, 2], "image_id": ["i1", "i1", "i2"],
    ...                       "wnid": "n00000001", "worker": ["w-a", "w-b", "w-a"], "answer": ["yes", "yes", "no"],
    ...                       "is_gold": False, "lead_time_s": 1.0,
    ...                       "submitted_at": pd.Timestamp("2026-01-01", tz="UTC")})
    >>> labels = pd.DataFrame({"image_id": ["i1", "i2"], "wnid": "n00000001", "status": "pending",
    ...                        "n_votes": [2, 1], "n_yes": [2, 0], "confidence": [0.95, 0.4], "method": "adaptive-ds"})
    >>> plan = pd.DataFrame({"image_id": ["i1", "i2"], "wnid": "n00000001", "n_more": [2, 3],
    ...                      "reason": "uncertain", "n_votes": [2, 1], "confidence": [0.95, 0.4]})
    >>> workers = pd.DataFrame({"worker": ["w-a", "w-b"], "flagged": False, "votes_used": True})
    >>> labels, plan, summary = apply_team(labels, plan, votes, workers, qc)
    >>> labels[["image_id", "status", "method"]].values.tolist()
    [['i1', 'accepted', 'adaptive-ds/small-team'], ['i2', 'pending', 'adaptive-ds']]
    >>> plan[["image_id", "n_more", "reason"]].values.tolist()
    [['i2', 1, 'uncertain']]
    >>> summary["team"], summary["small_team_accepted"], summary["push_votes"]
    (2, 1, 1)

Vote accounting (`vote_accounting`): per worker, the votes QC counts and the repeats it ignores. The crowd status,
the `crowd workers` table and the release report all count with it, so they agree with QC's `workers` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

NEEDS_NEW_ANNOTATOR = "needs_new_annotator"
SMALL_TEAM = "small-team"
PAIR = ["image_id", "wnid"]
ACCOUNTING_COLUMNS = ["worker", "n_votes", "n_repeats", "n_pulled"]


@dataclass(frozen=True)
class Team:
    """The annotators QC can still ask: `members` (active and not flagged); `source` says how they were found
    ("qc.team", "window" or "unknown": nobody has voted yet and qc.team is empty)."""

    members: frozenset[str]
    source: str
    flagged: int = 0  # active annotators left out because QC flags them
    active_days: float = 14.0

    @property
    def known(self) -> bool:
        return self.source != "unknown"

    def describe(self) -> str:
        """'2 active annotator(s) (voted within 14 days of the newest vote)' and the like."""
        if not self.known:
            return "team unknown until the first votes arrive (qc.team is empty)"
        how = ("listed in qc.team" if self.source == "qc.team"
               else f"voted within {self.active_days:g} days of the newest vote")
        out = f"{len(self.members)} active annotator(s) ({how})"
        if self.flagged:
            out += f"; {self.flagged} more flagged by QC and not counted"
        return out


def counted_votes(votes: pd.DataFrame) -> pd.DataFrame:
    """The votes QC counts: one per worker and pair (the latest answer), as `stage.clean_votes` keeps them."""
    from pipeline.qc.stage import clean_votes  # stage imports this module: imported here, not at the top

    return clean_votes(votes)


def vote_accounting(votes: pd.DataFrame) -> pd.DataFrame:
    """One row per worker: n_votes (what QC counts), n_repeats (pulled votes QC ignores: a worker's earlier answers
    on a pair they answered again), n_pulled (every row of `votes`). Sorted by worker.

        >>> v = pd.DataFrame({"annotation_id": [1, 2, 3], "image_id": ["i", "i", "j"], "wnid": "n00000001",
        ...                   "worker": ["w-a", "w-a", "w-a"], "answer": ["yes", "no", "yes"],
        ...                   "submitted_at": pd.to_datetime([1, 2, 3], unit="s", utc=True)})
        >>> vote_accounting(v).values.tolist()
        [['w-a', 2, 1, 3]]
    """
    if votes is None or votes.empty:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "worker" else "int64") for c in ACCOUNTING_COLUMNS})
    pulled = votes["worker"].astype(str).value_counts()
    counted = counted_votes(votes)["worker"].astype(str).value_counts().reindex(pulled.index, fill_value=0)
    out = pd.DataFrame({"worker": pulled.index.astype(str), "n_votes": counted.to_numpy(np.int64),
                        "n_repeats": (pulled - counted).to_numpy(np.int64), "n_pulled": pulled.to_numpy(np.int64)})
    return out.sort_values("worker", kind="stable").reset_index(drop=True)[ACCOUNTING_COLUMNS]


def active_team(votes: pd.DataFrame | None, workers: pd.DataFrame | None, qc: Any) -> Team:
    """Who QC can still ask (see the module docstring): qc.team, or the workers who voted within qc.active_days of
    the newest vote; minus the workers QC flags."""
    flagged = set()
    if workers is not None and len(workers) and "flagged" in workers:
        flagged = set(workers.loc[workers["flagged"].astype(bool), "worker"].astype(str))
    days = float(getattr(qc, "active_days", 14.0))
    team = [str(w).strip() for w in (getattr(qc, "team", None) or []) if str(w).strip()]
    if team:
        active, source = set(team), "qc.team"
    elif votes is None or votes.empty:
        return Team(frozenset(), "unknown", 0, days)
    else:
        when = pd.to_datetime(votes["submitted_at"], utc=True)
        last = when.groupby(votes["worker"].astype(str).to_numpy()).max()
        active, source = set(last.index[last >= when.max() - pd.Timedelta(days=days)]), "window"
    return Team(frozenset(active - flagged), source, len(active & flagged), days)


def _isin(values: pd.Series, names: set[str] | frozenset[str]) -> np.ndarray:
    """values.isin(names), looked up once per distinct value (pandas' isin turns each of a team's names into an
    Arrow scalar first)."""
    codes, distinct = pd.factorize(values)
    hit = np.fromiter((d in names for d in distinct), dtype=bool, count=len(distinct))
    return np.append(hit, False)[codes]  # code -1 (missing) -> False


def _per_pair(frame: pd.DataFrame, counts: pd.DataFrame, column: str) -> np.ndarray:
    """counts[column] for each (image_id, wnid) row of frame (0 where counts has no row)."""
    if frame.empty:
        return np.zeros(0, dtype=np.int64)
    merged = frame[PAIR].merge(counts, on=PAIR, how="left")
    return merged[column].fillna(0).to_numpy(np.int64)


def apply_team(labels: pd.DataFrame, plan: pd.DataFrame, votes: pd.DataFrame, workers: pd.DataFrame, qc: Any
               ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """QC's (labels, push_plan) fitted to the team (see the module docstring), and a summary for the loop:
    team, team_source, needs_new_annotator, small_team_accepted / _rejected, team_capped_votes, push_pairs,
    push_votes (rows with n_more > 0 only) and team_note (the same in words)."""
    team = active_team(votes, workers, qc)
    labels, plan = labels.copy(), plan.copy()
    accepted = rejected = capped = 0
    stuck_pending = 0
    if team.known and len(plan):
        v = counted_votes(votes) if votes is not None and len(votes) else pd.DataFrame(columns=[*PAIR, "worker"])
        v = v.assign(worker=v["worker"].astype(str))
        by_member = v[_isin(v["worker"], team.members)].groupby(PAIR).size().rename("members").reset_index()
        used_workers = (set(workers.loc[workers["votes_used"].astype(bool), "worker"].astype(str))
                        if workers is not None and len(workers) and "votes_used" in workers else set(v["worker"]))
        by_used = v[_isin(v["worker"], used_workers)].groupby(PAIR).size().rename("used").reset_index()
        available = len(team.members) - _per_pair(plan, by_member, "members")
        n_used = _per_pair(plan, by_used, "used")
        n_more = plan["n_more"].to_numpy(np.int64)
        new_more = np.minimum(n_more, np.maximum(available, 0))
        capped = int((n_more - new_more)[n_more > 0].sum())
        stuck = (n_more > 0) & (available <= 0)
        p = plan["confidence"].to_numpy(np.float64)
        acc_at, rej_at = float(qc.small_team_accept_at), float(qc.small_team_reject_at)
        decide = stuck & bool(qc.small_team_decide) & (n_used > 0) & ((p >= acc_at) | (p <= rej_at))
        if decide.any():
            decided = plan.loc[decide, PAIR].assign(_new=np.where(p[decide] >= acc_at, "accepted", "rejected"))
            hit = labels[PAIR].merge(decided, on=PAIR, how="left")["_new"].to_numpy(dtype=object)
            mask = pd.notna(hit)
            labels.loc[mask, "status"] = hit[mask]
            labels.loc[mask, "method"] = [f"{m}/{SMALL_TEAM}" for m in labels.loc[mask, "method"]]
            accepted, rejected = int((hit[mask] == "accepted").sum()), int((hit[mask] == "rejected").sum())
        plan["n_more"] = new_more.astype(plan["n_more"].dtype)
        plan.loc[stuck, "reason"] = NEEDS_NEW_ANNOTATOR
        plan = plan[~decide].reset_index(drop=True)
        stuck_pending = int((plan["reason"] == NEEDS_NEW_ANNOTATOR).sum())
    asking = plan[plan["n_more"] > 0] if len(plan) else plan
    summary = {
        "team": len(team.members), "team_source": team.source, "team_flagged": team.flagged,
        "needs_new_annotator": stuck_pending, "small_team_accepted": accepted, "small_team_rejected": rejected,
        "team_capped_votes": capped, "push_pairs": int(len(asking)),
        "push_votes": int(asking["n_more"].sum()) if len(asking) else 0,
    }
    summary["team_note"] = team_note(team, summary, qc)
    return labels, plan, summary


def team_note(team: Team, summary: dict[str, Any], qc: Any) -> str:
    """The team's situation in words, for `synsetforge qc`, `crowd status`, `crowd loop` and the crowd DAG."""
    parts = [f"team: {team.describe()}."]
    decided = summary["small_team_accepted"] + summary["small_team_rejected"]
    bars = (f"accept at P(yes) >= {qc.small_team_accept_at:g}, reject at <= {qc.small_team_reject_at:g}, "
            f"instead of {getattr(qc, 'accept_at', 0.99):g} / {getattr(qc, 'reject_at', 0.01):g}")
    if decided:
        parts.append(f"{decided} pair(s) that every active annotator had voted on were decided at the small-team bar "
                     f"({bars}): {summary['small_team_accepted']} accepted, {summary['small_team_rejected']} rejected "
                     f"(labels.method ends in /{SMALL_TEAM}).")
    if summary["needs_new_annotator"]:
        why = ("qc.small_team_decide is false" if not qc.small_team_decide
               else "their posterior is between the small-team bars, or no counted vote stands behind it")
        parts.append(f"{summary['needs_new_annotator']} pair(s) need a new annotator: everyone active has voted on "
                     f"them and they are still undecided ({why}); they stay pending until someone new votes "
                     "(`synsetforge crowd invite --create EMAIL`).")
    capped = summary.get("team_capped_votes")  # None: not known (crowd status reads the tables QC wrote)
    if capped:
        parts.append(f"{capped} vote(s) QC wanted were not asked for: the team cannot give them (one vote per "
                     "person and pair).")
    if team.known and capped == 0 and not (decided or summary["needs_new_annotator"]):
        parts.append("every vote the plan asks for can come from someone who has not voted on that pair.")
    return " ".join(parts)


def team_status(votes: pd.DataFrame, workers: pd.DataFrame, labels: pd.DataFrame, plan: pd.DataFrame, qc: Any
                ) -> dict[str, Any]:
    """The team's situation from the tables QC wrote (for `crowd status`): team, needs_new_annotator (plan rows with
    that reason), small_team_accepted / _rejected (labels whose method ends in /small-team) and team_note."""
    team = active_team(votes, workers, qc)
    small = labels[labels["method"].astype(str).str.endswith(f"/{SMALL_TEAM}")] if len(labels) else labels
    out = {"team": len(team.members), "team_source": team.source, "team_flagged": team.flagged,
           "needs_new_annotator": int((plan["reason"] == NEEDS_NEW_ANNOTATOR).sum()) if len(plan) else 0,
           "small_team_accepted": int((small["status"] == "accepted").sum()) if len(small) else 0,
           "small_team_rejected": int((small["status"] == "rejected").sum()) if len(small) else 0}
    out["team_note"] = team_note(team, out, qc)
    return out
