"""Decisions for a block of synsets: the pure core QC's rounds and `stage.aggregate` share.

A block's pairs come from votes and from `Sources` (gold tasks, pushed tasks, ingest links, pairs asked for by
hand); the worker model (`pipeline.qc.engine.fit_model`) gives each pair its posteriors; `decide_block` turns
them into the block's rows of labels, push_plan, qc_pairs and qc_synsets by the QC method (see
`pipeline.qc.stage`), leaving out controls (the `gold` table) and fitting the plan to the team
(`pipeline.qc.team`). Everything here is per synset, given the crowd-wide model (`Context`), so deciding the
synsets in blocks gives the same rows as deciding them all at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.qc.adaptive import group_precision
from pipeline.qc.base import NO, YES, QCInputError
from pipeline.qc.confidence_table import ConfidenceTable, build_table
from pipeline.qc.engine import DECISION_COLUMNS, EPS, Params, Totals, adaptive_decisions, apply_budget, logit
from pipeline.qc.team import NEEDS_NEW_ANNOTATOR, SMALL_TEAM, Team, active_team, apply_team, team_note
from pipeline.qc.votes import PAIR, Block

LABEL_COLUMNS = ["image_id", "wnid", "status", "n_votes", "n_yes", "confidence", "method"]
PLAN_COLUMNS = ["image_id", "wnid", "n_more", "reason", "n_votes", "confidence"]
STATE_COLUMNS = ["wnid", "image_id", "gold_answer", "linked", "tasked", "asked", "n_votes", "n_yes", "n_ok", "n_ok_yes",
                 "n_kept", "p_all", "p_kept"]
NO_GOLD_NOTE = "no gold controls yet: workers are judged by agreement only"
SYNSET_COLUMNS = ["wnid", "n_tasks", "accepted", "rejected", "pending", "n_votes", "votes_per_task", "est_precision",
                  "push_pairs", "push_votes", "votes", "gold", "gold_votes", "needs_new_annotator", "small_team_accepted",
                  "small_team_rejected", "team_capped_votes", "round"]


def empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({"wnid": pd.Series(dtype=object), "image_id": pd.Series(dtype=object)})


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("wnid", kind="stable").reset_index(drop=True)


@dataclass
class Sources:
    """Pairs QC decides besides the voted ones, and what it knows about them (all sorted by wnid):
    `gold` (wnid, image_id, gold_answer: the gold tasks, the last answer per pair), `tasked` (non-gold tasks),
    `linked` (image_links minus near copies), `asked` (by hand), `controls` (the gold table: left out of labels)."""

    gold: pd.DataFrame = field(default_factory=lambda: empty_pairs().assign(gold_answer=pd.Series(dtype=object)))
    tasked: pd.DataFrame = field(default_factory=empty_pairs)
    linked: pd.DataFrame = field(default_factory=empty_pairs)
    asked: pd.DataFrame = field(default_factory=empty_pairs)
    controls: pd.DataFrame = field(default_factory=empty_pairs)

    NAMES = ("gold", "tasked", "linked", "asked", "controls")

    def __post_init__(self) -> None:
        for name in self.NAMES:
            frame = getattr(self, name)
            cols = [*PAIR, "gold_answer"] if name == "gold" else PAIR
            frame = frame[cols].astype({"wnid": str, "image_id": str}).drop_duplicates(PAIR, keep="last")
            setattr(self, name, _sorted(frame))

    def wnids(self) -> set[str]:
        return set().union(*(set(pd.unique(getattr(self, n)["wnid"])) for n in self.NAMES if n != "controls"))

    def restrict(self, wnids: list[str] | set[str]) -> Sources:
        """The rows of these synsets (a sorted, contiguous range is cut by binary search)."""
        wanted = sorted(set(wnids))
        out = {}
        for name in self.NAMES:
            frame = getattr(self, name)
            w = frame["wnid"].to_numpy(dtype=object)
            if wanted and len(w):
                lo, hi = np.searchsorted(w, wanted[0], "left"), np.searchsorted(w, wanted[-1], "right")
                frame = frame.iloc[lo:hi]
                frame = frame[frame["wnid"].isin(wanted)]
            else:
                frame = frame.iloc[0:0]
            out[name] = frame
        return Sources(**out)

    def pairs(self) -> pd.DataFrame:
        return pd.concat([getattr(self, n)[PAIR] for n in ("gold", "tasked", "linked", "asked")], ignore_index=True)


@dataclass
class Flags:
    """Per pair of a block (its row order): gold (-1 none, 0 no, 1 yes), gold_answer, linked, tasked, asked,
    control."""

    gold: np.ndarray
    gold_answer: np.ndarray
    linked: np.ndarray
    tasked: np.ndarray
    asked: np.ndarray
    control: np.ndarray


def flags_of(pairs: pd.DataFrame, sources: Sources) -> Flags:
    n = len(pairs)
    index = pd.MultiIndex.from_frame(pairs[PAIR]) if n else None

    def hit(frame: pd.DataFrame) -> np.ndarray:
        out = np.zeros(n, dtype=bool)
        if n and len(frame):
            pos = index.get_indexer(pd.MultiIndex.from_frame(frame[PAIR]))
            out[pos[pos >= 0]] = True
        return out

    gold = np.full(n, -1, dtype=np.int64)
    answer = np.full(n, None, dtype=object)
    if n and len(sources.gold):
        pos = index.get_indexer(pd.MultiIndex.from_frame(sources.gold[PAIR]))
        ok = pos >= 0
        ans = sources.gold["gold_answer"].to_numpy(dtype=object)[ok]
        answer[pos[ok]] = ans
        gold[pos[ok]] = np.where(ans == YES, 1, 0)
    return Flags(gold, answer, hit(sources.linked), hit(sources.tasked), hit(sources.asked), hit(sources.controls))


def gold_frame(tasks: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(gold, tasked) source frames from task rows (image_id, wnid, is_gold, gold_answer), in table order: the
    gold tasks' answers (the last per pair; 'yes'/'no' checked) and the non-gold tasks' pairs."""
    if tasks is None or not len(tasks):
        return Sources().gold, empty_pairs()
    is_gold = tasks["is_gold"].astype(bool).to_numpy()
    g = tasks[is_gold & tasks["gold_answer"].notna().to_numpy()]
    ans = g["gold_answer"].astype(str).str.strip().str.lower()
    bad = ~ans.isin([YES, NO])
    if bad.any():
        ids = g.loc[bad, "task_id"].head(5).tolist() if "task_id" in g else []
        raise QCInputError(f"tasks table: gold_answer must be 'yes' or 'no'; task ids {ids} "
                           f"have {sorted(set(g.loc[bad, 'gold_answer']))[:5]}; fix the gold set and rerun")
    gold = pd.DataFrame({"wnid": g["wnid"].astype(str).to_numpy(), "image_id": g["image_id"].astype(str).to_numpy(),
                         "gold_answer": ans.to_numpy()})
    t = tasks[~is_gold]
    return gold, pd.DataFrame({"wnid": t["wnid"].astype(str).to_numpy(), "image_id": t["image_id"].astype(str).to_numpy()})


# ----- the crowd-wide context ---------------------------------------------------------------------------------
@dataclass
class Calibration:
    """The confidence-table method's crowd-wide inputs: how many calibration images (non-gold pairs with at least
    `min_votes` counted votes of workers not failing gold) have each (n_yes, n_votes), and the largest vote count
    any decided pair has. Sums over synsets, so a round adds and subtracts the synsets it re-decides."""

    hist: dict[tuple[int, int], float] = field(default_factory=dict)
    max_m: int = 0

    @staticmethod
    def of(n_ok_yes: np.ndarray, n_ok: np.ndarray, gold: np.ndarray, min_votes: int) -> Calibration:
        sel = (gold < 0) & (n_ok >= min_votes)
        out = Calibration(max_m=int(n_ok[gold < 0].max(initial=0)))
        if sel.any():
            keys, counts = np.unique(np.stack([n_ok_yes[sel], n_ok[sel]], axis=1), axis=0, return_counts=True)
            out.hist = {(int(y), int(n)): float(c) for (y, n), c in zip(keys, counts, strict=True)}
        return out

    def combine(self, other: Calibration, sign: float) -> Calibration:
        hist = dict(self.hist)
        for k, v in other.hist.items():
            hist[k] = hist.get(k, 0.0) + sign * v
        return Calibration({k: v for k, v in hist.items() if v > 0.5}, max(self.max_m, other.max_m))

    def to_json(self) -> str:
        return json.dumps({"hist": sorted([y, n, c] for (y, n), c in self.hist.items()), "max_m": self.max_m})

    @staticmethod
    def from_json(text: str | None) -> Calibration:
        if not text:
            return Calibration()
        d = json.loads(text)
        return Calibration({(int(y), int(n)): float(c) for y, n, c in d.get("hist", [])}, int(d.get("max_m", 0)))

    def pooled(self, max_m: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.hist:
            return None
        keys = np.array(list(self.hist.keys()), dtype=np.int64)
        w = np.array(list(self.hist.values()))
        good = (keys[:, 0] * 2 > keys[:, 1]).astype(np.float64)
        return build_table(keys[:, 0], keys[:, 1], good, max_m, 0.0, float((good * w).sum() / w.sum()), weights=w)


@dataclass
class Context:
    """What deciding a block needs from the whole crowd."""

    method: str
    params: Params
    qc: Any
    step: float
    prior_yes: float
    workers: pd.DataFrame  # the workers table (flags)
    names: list[str]  # worker names by code
    team: Team
    team_qc: Any  # the qc settings apply_team sees (the active team given by name)
    calibration: Calibration
    round: int = 0


def team_for(names: list[str], last_vote_at: np.ndarray, workers: pd.DataFrame, qc: Any) -> tuple[Team, Any]:
    """The active team from each worker's newest vote (`last_vote_at`, int64 microseconds, min for none), and the
    settings to give `apply_team` so that it uses that team on a block's votes."""
    has = last_vote_at > np.iinfo(np.int64).min
    synthetic = pd.DataFrame({"worker": np.asarray(names, dtype=object)[has],
                              "submitted_at": pd.to_datetime(last_vote_at[has], unit="us", utc=True)})
    team = active_team(synthetic, workers, qc)
    if getattr(qc, "team", None) or not team.known:
        return team, qc
    days = float(getattr(qc, "active_days", 14.0))
    when = last_vote_at[has]
    active = sorted(np.asarray(names, dtype=object)[has][when >= when.max() - int(days * 86400e6)].tolist())
    fields_ = {k: getattr(qc, k) for k in ("active_days", "small_team_decide", "small_team_accept_at",
                                           "small_team_reject_at", "accept_at", "reject_at") if hasattr(qc, k)}
    return team, SimpleNamespace(**fields_, team=active)


# ----- deciding a block ---------------------------------------------------------------------------------------
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


def _ct_probabilities(groups: np.ndarray, n_yes: np.ndarray, n_tot: np.ndarray, present: np.ndarray, min_votes: int,
                      calibration: Calibration) -> np.ndarray:
    """ConfidenceTable's P(good) per pair: its synset's table from its calibration images, the pooled table of all
    synsets where it has none, 0.5 without any."""
    max_m = int(max(calibration.max_m, n_tot[present].max(initial=0), min_votes))
    pooled = calibration.pooled(max_m)
    p = np.full(len(groups), 0.5)
    calib = present & (n_tot >= min_votes)
    good = (n_yes * 2 > n_tot).astype(np.float64)
    for g in pd.unique(groups[present]):
        in_g = present & (groups == g)
        sel = in_g & calib
        table = build_table(n_yes[sel], n_tot[sel], good[sel], max_m, 0.0, good[sel].mean()) if sel.any() else pooled
        if table is not None:
            p[in_g] = ConfidenceTable._look(table[0], n_yes[in_g], n_tot[in_g])
    return p


def method_decisions(ctx: Context, keys: pd.Index, groups: np.ndarray, n_votes: np.ndarray, n_yes: np.ndarray,
                     n_ok: np.ndarray, n_ok_yes: np.ndarray, p_all: np.ndarray) -> pd.DataFrame:
    """Decisions (DECISION_COLUMNS, indexed by `keys`) by ds, mv or confidence-table (see pipeline.qc.stage): the
    votes of workers failing gold left out (n_ok), ds reading fit A's posterior, mv the share of yes."""
    qc, method = ctx.qc, ctx.method
    target = qc.max_votes_per_image
    if method == "mv":
        p = np.where(n_ok > 0, n_ok_yes / np.maximum(n_ok, 1), 0.5)
    elif method == "ds":
        p = np.where(n_ok > 0, p_all, 0.5)
    else:
        p = _ct_probabilities(groups, n_ok_yes, n_ok, n_ok > 0, target, ctx.calibration)
    p = np.where(n_ok > 0, p, 0.5)
    full = n_votes >= target
    if method in ("mv", "ds"):
        decided = full & (n_ok > 0) & (p != 0.5)
        status = np.where(decided, np.where(p > 0.5, "accepted", "rejected"), "pending")
        n_more = np.where(full, 0, target - n_votes)
        reason = np.where(decided, "decided", np.where(full, "cap", np.where(n_votes == 0, "new", "fixed")))
    else:
        calib = calibration_subset(keys, pd.Series(groups, index=keys), qc.calibration_share)
        has_table = bool(ctx.calibration.hist)
        ready = ~calib | full  # a calibration image decides once it has all its votes
        decided = ready & (n_ok > 0) & ((p >= qc.accept_at) | (p <= qc.reject_at))
        status = np.where(decided, np.where(p >= qc.accept_at, "accepted", "rejected"), "pending")
        waiting = np.full(len(keys), not has_table)
        reason = np.select([decided, full, calib, n_votes == 0, waiting],
                           ["decided", "cap", "calibration", "new", "calibrating"], "uncertain").astype(object)
        n_more = np.select([reason == "calibration", reason == "new", reason == "uncertain"],
                           [target - n_votes, np.minimum(qc.initial_votes, target - n_votes), np.ones_like(n_votes)], 0)
    if qc.max_batch:
        n_more = np.minimum(n_more, qc.max_batch)
    dec = pd.DataFrame({"group": groups, "n_votes": n_votes, "n_yes": n_yes, "n_used": n_ok, "p_yes": p,
                        "status": status, "n_more": np.asarray(n_more).astype(np.int64), "reason": reason}, index=keys,
                       columns=DECISION_COLUMNS)
    if qc.budget_per_synset is not None:
        dec = apply_budget(dec, qc.budget_per_synset)
    return dec


@dataclass
class Decided:
    """A block's rows of labels, push_plan, qc_pairs and qc_synsets; `team` its team counts."""

    labels: pd.DataFrame
    plan: pd.DataFrame
    state: pd.DataFrame
    synsets: pd.DataFrame
    team: dict[str, int]
    margin: pa.Table
    team_per_wnid: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["wnid"]))


def decide_block(block: Block, flags: Flags, fit: Any, ctx: Context, sl: slice = slice(None)) -> Decided:
    """The block's rows, from the fit's per-task arrays (their slice `sl` holds this block's tasks)."""
    pairs = block.pairs

    arr = {k: np.asarray(getattr(fit, k))[sl] for k in ("n_votes", "n_yes", "n_ok", "n_ok_yes", "n_kept", "p_all",
                                                         "p_kept", "p")}
    state = pd.DataFrame({"wnid": pairs["wnid"].to_numpy(), "image_id": pairs["image_id"].to_numpy(),
                          "gold_answer": flags.gold_answer, "linked": flags.linked, "tasked": flags.tasked,
                          "asked": flags.asked, **{k: arr[k].astype(np.int32) for k in
                                                   ("n_votes", "n_yes", "n_ok", "n_ok_yes", "n_kept")},
                          "p_all": arr["p_all"].astype(np.float64), "p_kept": arr["p_kept"].astype(np.float64)},
                         columns=STATE_COLUMNS)
    dec_rows = np.flatnonzero(flags.gold < 0)  # gold tasks train the model and get no decision
    image = pairs["image_id"].to_numpy(dtype=object)[dec_rows]
    wnid = pairs["wnid"].to_numpy(dtype=object)[dec_rows]
    need_keys = ctx.method == "confidence-table" or (
        ctx.qc.budget_per_synset is not None)
    keys = pd.Index(image + "|" + wnid) if need_keys and len(dec_rows) else pd.RangeIndex(len(dec_rows))
    pick = {k: v[dec_rows] for k, v in arr.items()}
    if ctx.method == "adaptive-ds":
        dec = adaptive_decisions(keys, wnid, pick["n_votes"], pick["n_yes"], pick["n_kept"], pick["p"], ctx.params,
                                 ctx.step)
    else:
        dec = method_decisions(ctx, keys, wnid, pick["n_votes"], pick["n_yes"], pick["n_ok"], pick["n_ok_yes"],
                               pick["p_all"])
    keep = ~flags.control[dec_rows]  # controls (the gold table) are known: neither labels nor asked about
    labels = pd.DataFrame({"image_id": image, "wnid": wnid, "status": dec["status"].to_numpy(),
                           "n_votes": dec["n_votes"].to_numpy(np.int32), "n_yes": dec["n_yes"].to_numpy(np.int32),
                           "confidence": dec["p_yes"].to_numpy(np.float64), "method": ctx.method},
                          columns=LABEL_COLUMNS)[keep].reset_index(drop=True)
    more = dec["n_more"].to_numpy(np.int64)
    asks = keep & (more > 0)
    plan = pd.DataFrame({"image_id": image[asks], "wnid": wnid[asks], "n_more": more[asks].astype(np.int32),
                         "reason": dec["reason"].to_numpy()[asks], "n_votes": dec["n_votes"].to_numpy(np.int32)[asks],
                         "confidence": dec["p_yes"].to_numpy(np.float64)[asks]}, columns=PLAN_COLUMNS)
    labels, plan, team = _fit_to_team(labels, plan, block, ctx)
    margin = _margin_rows(block, labels, dec_rows[keep], arr, ctx)
    return Decided(labels, plan, state, synset_rows(labels, plan, state, team["per_wnid"], ctx.round), team["totals"],
                   margin, team["per_wnid"])


# ----- the watch: pairs near a threshold, re-scored every round ------------------------------------------------
WATCH_LOGIT = 1.5  # pairs this close (in log-odds) to a threshold when their synset is decided are watched
MARGIN_SCHEMA = pa.schema([("wnid", pa.string()), ("image_id", pa.string()), ("votes", pa.list_(pa.int32())),
                           ("p_all", pa.float64()), ("p_kept", pa.float64()), ("status", pa.string())])


def _watched(method: str, qc: Any, p: np.ndarray, n_votes: np.ndarray) -> np.ndarray:
    if method == "adaptive-ds":
        lo = logit(p)
        return (n_votes > 0) & ((np.abs(lo - logit(qc.accept_at)) < WATCH_LOGIT) |
                                (np.abs(lo - logit(qc.reject_at)) < WATCH_LOGIT))
    if method == "ds":  # decided at the cap on the side of 0.5 it lies
        return (n_votes >= qc.max_votes_per_image) & (np.abs(logit(p)) < WATCH_LOGIT)
    return np.zeros(len(p), dtype=bool)  # mv and confidence-table do not read the worker model


def _margin_rows(block: Block, labels: pd.DataFrame, rows: np.ndarray, arr: dict[str, np.ndarray], ctx: Context
                 ) -> pa.Table:
    """The watched pairs among the block's labels (`rows`: their task codes, in labels order): those near a
    threshold, left out the ones decided at the small-team bar (another rule decided them)."""
    p = labels["confidence"].to_numpy(np.float64)
    watch = _watched(ctx.method, ctx.qc, p, labels["n_votes"].to_numpy()) & \
        ~labels["method"].astype(str).str.endswith(f"/{SMALL_TEAM}").to_numpy()
    tasks = rows[watch]
    if not len(tasks):
        return MARGIN_SCHEMA.empty_table()
    order = np.argsort(block.task, kind="stable")
    t_sorted = block.task[order]
    lo, hi = np.searchsorted(t_sorted, tasks, "left"), np.searchsorted(t_sorted, tasks, "right")
    pick = np.concatenate([order[a:b] for a, b in zip(lo, hi, strict=True)]) if len(tasks) else np.zeros(0, np.int64)
    signed = np.where(block.label[pick] == 1, block.worker[pick] + 1, -(block.worker[pick] + 1)).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int32)
    return pa.table({"wnid": labels["wnid"].to_numpy()[watch], "image_id": labels["image_id"].to_numpy()[watch],
                     "votes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(signed)),
                     "p_all": arr["p_all"][tasks], "p_kept": arr["p_kept"][tasks],
                     "status": labels["status"].to_numpy()[watch]}, schema=MARGIN_SCHEMA)


def rescore(margin: pa.Table, fit: Any, params: Params, method: str, qc: Any) -> np.ndarray:
    """The status each watched pair would get from the worker model `fit` left (its totals, flags, prior and class
    shares), its own posteriors held: the adaptive rule's leave-one-out posterior (or the plug-in one with
    calibrated off) from the unflagged votes, or fit A's posterior for ds. One pass over the watched votes."""
    n = margin.num_rows
    if not n:
        return np.zeros(0, dtype=object)
    votes = margin.column("votes").combine_chunks()
    flat = votes.flatten().to_numpy().astype(np.int64)
    offsets = votes.offsets.to_numpy()
    pair = np.repeat(np.arange(n), np.diff(offsets))
    worker, label = np.abs(flat) - 1, (flat > 0).astype(np.int64)
    totals: Totals = fit.totals
    if method == "ds":
        use = ~fit.failed[worker]
        counts = totals.soft_counts("all") + params.fixed().matrix(2)[None]
        err = counts / counts.sum(axis=1, keepdims=True)
        w, lab = worker[use], label[use]
        diff = np.log(np.clip(err[w, lab, 1], EPS, None)) - np.log(np.clip(err[w, lab, 0], EPS, None))
        lo = logit(fit.prior_all) + np.bincount(pair[use], weights=diff, minlength=n)
        p = 1.0 / (1.0 + np.exp(-lo))
        n_ok = np.bincount(pair[use], minlength=n)
        n_votes = np.diff(offsets)
        decided = (n_votes >= qc.max_votes_per_image) & (n_ok > 0) & (p != 0.5)
        return np.where(decided, np.where(p > 0.5, "accepted", "rejected"), "pending").astype(object)
    keep = fit.table["votes_used"].to_numpy(bool)[worker]
    w, lab, t = worker[keep], label[keep], pair[keep]
    pseudo = fit.prior.matrix(2)
    counts = totals.soft_counts("kept")
    pk = margin.column("p_kept").to_numpy()[t]
    pt = np.column_stack([1.0 - pk, pk])
    if params.calibrated:  # the pair's own share out of its workers' counts
        cell = counts[w, lab, :] - pt + pseudo[lab, :]
        col = counts[w].sum(axis=1) + pseudo.sum(axis=0)[None, :] - pt
    else:
        cell = counts[w, lab, :] + pseudo[lab, :]
        col = counts[w].sum(axis=1) + pseudo.sum(axis=0)[None, :]
    err = np.clip(cell, EPS, None) / np.clip(col, EPS, None)
    lo = logit(fit.prior_yes) + np.bincount(t, weights=np.log(err[:, 1]) - np.log(err[:, 0]), minlength=n)
    p = 1.0 / (1.0 + np.exp(-lo))
    status = np.where(p >= params.accept_at, "accepted", np.where(p <= params.reject_at, "rejected", "pending"))
    return np.where(np.bincount(t, minlength=n) == 0, "pending", status).astype(object)


def _fit_to_team(labels: pd.DataFrame, plan: pd.DataFrame, block: Block, ctx: Context
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """`pipeline.qc.team.apply_team` on the block, with the crowd's active team; counts per synset."""
    zero = {"needs_new_annotator": 0, "small_team_accepted": 0, "small_team_rejected": 0, "team_capped_votes": 0}
    if not ctx.team.known or not len(plan):
        return labels, plan, {"per_wnid": pd.DataFrame(columns=["wnid", *zero]), "totals": dict(zero)}
    asked = pd.MultiIndex.from_frame(plan[PAIR])  # pairs are matched once, then votes by their task code
    asked_task = asked.get_indexer(pd.MultiIndex.from_frame(block.pairs[PAIR])) >= 0
    rows = asked_task[block.task]
    votes = block.votes_frame(rows, ctx.names)
    before = plan
    labels, plan, summary = apply_team(labels, plan, votes, ctx.workers, ctx.team_qc)
    merged = before[[*PAIR, "n_more"]].merge(plan[[*PAIR, "n_more"]], on=PAIR, how="left", suffixes=("", "_after"))
    merged["capped"] = np.where(merged["n_more"] > 0, merged["n_more"] - merged["n_more_after"].fillna(0), 0)
    small = labels[labels["method"].astype(str).str.endswith(f"/{SMALL_TEAM}")]
    per = pd.DataFrame({"wnid": sorted(set(before["wnid"]))})
    per["needs_new_annotator"] = per["wnid"].map(plan[plan["reason"] == NEEDS_NEW_ANNOTATOR].groupby("wnid").size()).fillna(0)
    per["small_team_accepted"] = per["wnid"].map(small[small["status"] == "accepted"].groupby("wnid").size()).fillna(0)
    per["small_team_rejected"] = per["wnid"].map(small[small["status"] == "rejected"].groupby("wnid").size()).fillna(0)
    per["team_capped_votes"] = per["wnid"].map(merged.groupby("wnid")["capped"].sum()).fillna(0)
    totals = {k: int(summary[k]) for k in zero}
    return labels, plan, {"per_wnid": per, "totals": totals}


def synset_rows(labels: pd.DataFrame, plan: pd.DataFrame, state: pd.DataFrame, team: pd.DataFrame, round_: int
                 ) -> pd.DataFrame:
    wnids = pd.Index(sorted(pd.unique(state["wnid"])), name="wnid")
    if not len(wnids):
        return pd.DataFrame(columns=SYNSET_COLUMNS)
    prec = group_precision(labels.rename(columns={"wnid": "group", "confidence": "p_yes"})).rename(
        columns={"group": "wnid"}).set_index("wnid").reindex(wnids)
    out = pd.DataFrame(index=wnids)
    for c in ("n_tasks", "accepted", "rejected", "pending", "n_votes"):
        out[c] = prec[c].fillna(0).astype(np.int64)
    out["votes_per_task"] = (out["n_votes"] / out["n_tasks"].where(out["n_tasks"] > 0)).fillna(0.0)
    out["est_precision"] = prec["est_precision"].astype(float)
    asking = plan[plan["n_more"] > 0]
    out["push_pairs"] = asking.groupby("wnid").size().reindex(wnids, fill_value=0).astype(np.int64)
    out["push_votes"] = asking.groupby("wnid")["n_more"].sum().reindex(wnids, fill_value=0).astype(np.int64)
    out["votes"] = state.groupby("wnid")["n_votes"].sum().reindex(wnids, fill_value=0).astype(np.int64)
    answered = state[state["gold_answer"].notna() & (state["n_votes"] > 0)]
    out["gold"] = answered.groupby("wnid").size().reindex(wnids, fill_value=0).astype(np.int64)
    out["gold_votes"] = answered.groupby("wnid")["n_votes"].sum().reindex(wnids, fill_value=0).astype(np.int64)
    t = team.set_index("wnid") if len(team) else pd.DataFrame(index=pd.Index([], name="wnid"))
    for c in ("needs_new_annotator", "small_team_accepted", "small_team_rejected", "team_capped_votes"):
        out[c] = (t[c].reindex(wnids).fillna(0) if c in t else pd.Series(0, index=wnids)).astype(np.int64)
    out["round"] = np.int64(round_)
    return out.reset_index()[SYNSET_COLUMNS]


def summary_of(synsets: pd.DataFrame, workers: pd.DataFrame, team: Team, qc: Any, gold_table_rows: int,
               method: str) -> dict[str, Any]:
    """run_qc's summary from the per-synset rows (all synsets) and the workers table."""
    s = synsets
    tot = lambda c: int(s[c].sum()) if len(s) else 0  # noqa: E731
    n_gold, gold_votes = tot("gold"), tot("gold_votes")
    if n_gold:
        note = f"{n_gold} gold control(s) answered ({gold_votes} vote(s)): workers are also judged on known answers"
    elif gold_table_rows:
        note = f"{NO_GOLD_NOTE} (the gold table holds {gold_table_rows} control(s), none answered yet)"
    else:
        note = f"{NO_GOLD_NOTE} (no gold table: `synsetforge crowd gold --refresh` builds one)"
    per = s[s["n_tasks"] > 0] if len(s) else s
    per_synset = per[["wnid", "n_tasks", "accepted", "rejected", "pending", "n_votes", "votes_per_task",
                      "est_precision"]].to_dict("records") if len(per) else []
    team_stats = {"team": len(team.members), "team_source": team.source, "team_flagged": team.flagged,
                  "needs_new_annotator": tot("needs_new_annotator"), "small_team_accepted": tot("small_team_accepted"),
                  "small_team_rejected": tot("small_team_rejected"), "team_capped_votes": tot("team_capped_votes"),
                  "push_pairs": tot("push_pairs"), "push_votes": tot("push_votes")}
    team_stats["team_note"] = team_note(team, team_stats, qc)
    return {
        "method": method, "votes": tot("votes"), "pairs": tot("n_tasks"), "accepted": tot("accepted"),
        "rejected": tot("rejected"), "pending": tot("pending"), "workers": int(len(workers)),
        "flagged_workers": int(workers["flagged"].sum()) if len(workers) else 0,
        "gold": n_gold, "gold_votes": gold_votes, "gold_table": int(gold_table_rows), "gold_note": note,
        "per_synset": per_synset, **team_stats,
    }
