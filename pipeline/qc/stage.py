"""QC I/O shell: votes + tasks + image_links + gold from the store -> labels, workers, push_plan, a round at a time.

The pure work is `aggregate(votes, tasks, pairs, settings)` (all votes in memory, one block); `run_qc(store,
settings)` runs one round on the store. Same input tables -> same output tables, so the crowd loop (pull ->
aggregate -> push) can rerun this step at will.

The method (`qc.method`, `synsetforge qc --method`, the crowd DAG's `qc_method` Param) decides how votes become
labels and what the push plan asks for; `labels.method` records it:

- ``adaptive-ds`` (default): `AdaptiveConsensus`'s rule (`pipeline.qc.engine`), a worker-aware posterior with
  flagged workers' votes left out; accept / reject at `accept_at` / `reject_at`, otherwise ask the votes still
  missing (at most `max_votes_per_image`).
- ``ds`` and ``mv``: a fixed overlap, as ImageNetV2 ran it: every image is asked for `max_votes_per_image`
  votes (`max_batch` at a time), then Dawid-Skene (with the `prior_accuracy` pseudo-answers) or majority vote
  decides: accepted if it says yes, rejected if no, pending on an exact tie.
- ``confidence-table``: ImageNet's scheme (`ConfidenceTable`): a calibration share (`calibration_share`,
  at least one image) of each synset, picked by a hash of the pair, is asked for `max_votes_per_image` votes;
  its table P(good | #yes, #no) then decides the other images, which get `initial_votes` and then one vote
  at a time until the table passes `accept_at` / `reject_at` or they reach `max_votes_per_image` (pending).
  Until any synset has a table, images that have their first votes wait (reason "calibrating").

For ds, mv and confidence-table the votes of workers who fail the gold controls are left out first (at least
`min_gold_to_flag` gold answers and a Wilson upper bound under `gold_min_accuracy`). Every method writes the same
`workers` table (the adaptive model's flags, which the crowd side uses to block workers) and respects
`budget_per_synset`. Gold (control) pairs train the worker model and are left out of `labels` and `push_plan`;
so are the pairs of the `gold` table. Until any control has been answered, QC judges workers by their agreement
alone, and the summary says so (`gold`, `gold_note`). The plan is then fitted to the team (`pipeline.qc.team`).

Rounds. QC keeps its state next to the tables it publishes: `qc_pairs` (per pair: what it gave the worker model),
`qc_workers` (stable integer worker codes and the model's sums over all tasks), `qc_synsets` (the per-synset
summary) and `qc_rounds` (a row when a round starts and one when it is done, with the Delta versions of votes,
tasks, image_links and gold it read: the watermark). A round is

- **incremental** (the crowd loop): the synsets that changed since the watermark are re-decided: new votes (the
  votes table's commits since the version QC last read, `Store.read_changes`), new gold tasks, ingest links or
  controls added or dropped, new pairs pushed or given with `--pairs`. Their votes are read with a wnid filter.
  With a pairwise method (adaptive-ds, ds, mv; no `budget_per_synset`) and a team of at least
  `max_votes_per_image` annotators, only the pairs that changed (new votes, gold or pushed tasks, asked by hand)
  and the watched pairs (`qc_margin`: near a threshold) are re-decided; a synset whose links or controls changed,
  one a round left unfinished, or one decided with a small team is re-decided whole. What those pairs gave the
  worker model last time is taken out and the new contribution put in (warm-starting from `qc_workers`:
  `pipeline.qc.engine`), and the synsets' rows of labels, push_plan, qc_pairs and qc_margin are replaced, the
  pairs not re-decided copied as they were (`Store.replace_rows`: only the data files holding those synsets are
  rewritten). workers, qc_workers and qc_synsets are rewritten (one row per worker or synset). The other
  synsets keep their labels until they get votes or the next full refit;
- **full** (`synsetforge qc --full`, the maintenance DAG, the first round, a change of qc settings or method,
  votes doubled since the last full refit (`REFIT_GROWTH`), or QC tables written outside a round): every synset.
  The votes are read in batches of whole synsets (about `BATCH_VOTES` each), cleaned and integer-coded batch by
  batch into chunks on local disk, the Dawid-Skene fits streamed over them (`DawidSkene.fit_stream`), and the
  tables written file by file, so memory follows the number of pairs and workers, not of votes;
- **unchanged**: nothing to re-decide (a round with no new input writes nothing at all).

A round appends its started row before it writes anything and its done row last, and reads QC's state at the
versions the last done row names: a round that dies half-way is redone by the next one from the same state (the
same synsets, or the whole refit) and leaves the same tables. Only one round may run at a time (the crowd DAG
runs one run at a time; keep `synsetforge qc` and the maintenance DAG's refit off a running crowd loop).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from pipeline.qc.adaptive import AdaptiveConsensus
from pipeline.qc.base import NO, YES, Aggregator, QCInputError, task_key
from pipeline.qc.decide import (
    LABEL_COLUMNS,
    MARGIN_SCHEMA,
    NO_GOLD_NOTE,
    PLAN_COLUMNS,
    STATE_COLUMNS,
    SYNSET_COLUMNS,
    Calibration,
    Context,
    Decided,
    Flags,
    Sources,
    calibration_subset,
    decide_block,
    empty_pairs,
    flags_of,
    gold_frame,
    rescore,
    summary_of,
    synset_rows,
    team_for,
)
from pipeline.qc.engine import Chunks, Params, SpilledChunks, Totals, block_totals, fit_model
from pipeline.qc.team import Team
from pipeline.qc.votes import PAIR, VOTE_COLUMNS, Block, WorkerCodes, as_votes_table
from pipeline.qc.workers import WORKER_COLUMNS, FlagRules

__all__ = ["BATCH_VOTES", "LAYOUT_TABLES", "METHOD", "METHODS", "NO_GOLD_NOTE", "REFIT_GROWTH", "aggregate",
           "calibration_subset", "check_method", "clean_votes", "gold_answers", "model_from_settings",
           "pairs_to_verify", "run_qc", "without_controls"]

METHOD = "adaptive-ds"
METHODS = ("adaptive-ds", "ds", "mv", "confidence-table")
REFIT_GROWTH = 1.25  # a round refits everything once the counted votes reach this multiple of the last full refit's
BATCH_VOTES = 2_000_000  # votes per batch of synsets in a full refit
WATCH_SHARE = 1.0  # synsets a round re-decides because a watched pair would change status, per synset that
# changed (at least one; the cost of a round at most doubles); the others wait for the next round
LAYOUT_TABLES = ("labels", "push_plan", "qc_pairs", "qc_margin")  # rows replaced synset by synset: keep their layout
OWN_TABLES = ("labels", "push_plan", "qc_pairs", "qc_margin", "qc_synsets", "qc_workers", "workers")
INPUTS = {"votes": "votes_version", "tasks": "tasks_version", "image_links": "links_version", "gold": "gold_version"}
OWN_VERSIONS = {"qc_pairs": "pairs_version", "qc_workers": "qc_workers_version", "qc_synsets": "synsets_version",
                "labels": "labels_version", "push_plan": "push_plan_version", "workers": "workers_version",
                "qc_margin": "margin_version"}
TASK_COLUMNS = ["task_id", "image_id", "wnid", "is_gold", "gold_answer"]
LINK_COLUMNS = ["image_id", "wnid", "near_duplicate_of"]
NEVER = np.iinfo(np.int64).min


def params_from_settings(qc: Any) -> Params:
    rules = FlagRules(min_votes=qc.min_votes_to_flag, min_gold=qc.min_gold_to_flag,
                      gold_min_accuracy=qc.gold_min_accuracy, min_accuracy=qc.block_below_accuracy)
    return Params(accept_at=qc.accept_at, reject_at=qc.reject_at, max_votes=qc.max_votes_per_image,
                  initial_votes=qc.initial_votes, max_batch=qc.max_batch, budget_per_group=qc.budget_per_synset,
                  prior_accuracy=qc.prior_accuracy, prior_strength=qc.prior_strength, n_iter=qc.ds_max_iter,
                  rules=rules, calibrated=getattr(qc, "calibrated", True))


def model_from_settings(qc: Any) -> AdaptiveConsensus:
    p = params_from_settings(qc)
    return AdaptiveConsensus(accept_at=p.accept_at, reject_at=p.reject_at, max_votes=p.max_votes,
                             initial_votes=p.initial_votes, max_batch=p.max_batch, budget_per_group=p.budget_per_group,
                             prior_accuracy=p.prior_accuracy, prior_strength=p.prior_strength, n_iter=p.n_iter,
                             rules=p.rules, calibrated=p.calibrated)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise QCInputError(f"QC method {method!r} is not one of {', '.join(METHODS)}; set qc.method "
                           "(or synsetforge qc --method) to one of them")
    return method


def settings_digest(qc: Any, method: str) -> str:
    """sha256 of the qc settings and the method: rounds under other settings must not be mixed."""
    data = qc.model_dump(mode="json") if hasattr(qc, "model_dump") else dict(vars(qc))
    data["method"] = method
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ----- votes and pairs as pandas (the team's vote accounting and tests read these) ----------------------------
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
    gold, _ = gold_frame(tasks)
    s = pd.Series(gold["gold_answer"].to_numpy(), index=task_key(gold["image_id"], gold["wnid"]).to_numpy(), dtype=object)
    return s[~s.index.duplicated(keep="last")]


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


def _checked_pairs(pairs: pd.DataFrame | None) -> pd.DataFrame:
    if pairs is None or not len(pairs):
        return empty_pairs()
    missing = [c for c in ("image_id", "wnid") if c not in pairs.columns]
    if missing:
        raise QCInputError(f"pairs: missing column(s) {missing}; give one row per (image_id, wnid) to decide")
    p = pairs.dropna(subset=["image_id", "wnid"])
    return pd.DataFrame({"wnid": p["wnid"].astype(str).to_numpy(), "image_id": p["image_id"].astype(str).to_numpy()})


# ----- the pure core -----------------------------------------------------------------------------------------
class Fitted(Aggregator):
    """What `aggregate` fitted: probas_ / labels_ per decided pair (task key), skills_ per worker, fit_ (the
    engine's `Fit`)."""

    def __init__(self, decided: Decided, fit: Any, workers: pd.DataFrame):
        keys = pd.Index(task_key(decided.labels["image_id"], decided.labels["wnid"]), name="task")
        p = decided.labels["confidence"].to_numpy()
        self.probas_ = pd.DataFrame({NO: 1 - p, YES: p}, index=keys).rename_axis(columns="label")
        self.labels_ = pd.Series(np.where(p > 0.5, YES, NO), index=keys, name="agg_label", dtype=object)
        self.skills_ = pd.Series(workers["estimated_accuracy"].to_numpy(), index=pd.Index(workers["worker"], name="worker"),
                                 name="skill")
        self.fit_ = fit


def aggregate(votes: pd.DataFrame, tasks: pd.DataFrame, pairs: pd.DataFrame | None, qc: Any,
              method: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Aggregator]:
    """Pure core: returns (labels, workers, push_plan, fitted). `method` overrides `qc.method`. All votes are one
    block; `run_qc` decides the same way block by block (and also leaves out controls and fits the team)."""
    method = check_method(method or getattr(qc, "method", METHOD))
    gold, tasked = gold_frame(tasks if tasks is not None and len(tasks) else None)
    sources = Sources(gold=gold, tasked=tasked, linked=_checked_pairs(pairs))
    codes = WorkerCodes([])
    block = Block.from_votes(as_votes_table(votes), codes, sources.pairs())
    flags = flags_of(block.pairs, sources)
    params = params_from_settings(qc)
    fit = fit_model(Chunks.of(block.task, block.worker, block.label, block.n_tasks, len(codes)), flags.gold, params,
                    names=codes.names)
    workers = _workers_table(fit)
    ctx = Context(method, params, qc, fit.step, fit.prior_yes, workers, codes.names, Team(frozenset(), "unknown"), qc,
                  Calibration.of(fit.n_ok_yes, fit.n_ok, flags.gold, qc.max_votes_per_image))
    decided = decide_block(block, flags, fit, ctx)
    return decided.labels, workers, decided.plan, Fitted(decided, fit, workers)


def _workers_table(fit: Any) -> pd.DataFrame:
    t = fit.table[fit.table["n_votes"] > 0]
    return t.sort_values("worker", kind="stable").reset_index(drop=True)[WORKER_COLUMNS]


# ----- rounds: what QC read and wrote last ------------------------------------------------------------------
@dataclass
class Round:
    row: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["row"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def synset_list(self) -> list[str]:
        s = self.row.get("synsets")
        return list(s) if s is not None else []


def _rounds(store: Any) -> tuple[Round | None, Round | None, int]:
    """(last done round, a started round after it that never finished, the next round number)."""
    v = store.table_version("qc_rounds")
    if v is None:
        return None, None, 1
    rows, back = None, 2
    while True:  # the newest commits hold the newest rows: read back until a done row
        since = max(v - back, -1)
        ch = store.read_changes("qc_rounds", since)
        if ch is None:
            rows = None
            break
        rows = ch.to_pandas()
        if (rows["state"] == "done").any() or since == -1:
            break
        back *= 4
    if rows is None:
        rows = store.read_table("qc_rounds").to_pandas()
    if not len(rows):
        return None, None, 1
    rows = rows.assign(_o=rows["state"].map({"started": 0, "done": 1})).sort_values(["round", "_o"], kind="stable")
    done = rows[rows["state"] == "done"]
    last = Round(done.iloc[-1].drop("_o").to_dict()) if len(done) else None
    after = rows[(rows["state"] == "started") & (rows["round"] > (last.round if last else 0))]
    pending = Round(after.iloc[-1].drop("_o").to_dict()) if len(after) else None
    return last, pending, int(rows["round"].max()) + 1


def _input_versions(store: Any) -> tuple[dict[str, int], list[str]]:
    out, legacy = {}, []
    for name, col in INPUTS.items():
        v = store.table_version(name)
        if v is None and store.has_table(name):
            legacy.append(name)
        out[col] = -1 if v is None else int(v)
    return out, legacy


def _state_intact(store: Any, last: Round) -> bool:
    """Did anything but QC's rounds (and data-neutral compaction or vacuum) write QC's tables since the last one?"""
    for name, col in OWN_VERSIONS.items():
        recorded = int(last.row[col])
        current = store.table_version(name)
        if current is None or current < recorded:
            return False
        if current > recorded:
            ch = store.read_changes(name, recorded, columns=[store_key_column(name)])
            if ch is None or ch.num_rows:
                return False
    return True


def store_key_column(name: str) -> str:
    return {"qc_workers": "code", "workers": "worker"}.get(name, "wnid")


def _read(store: Any, name: str, columns: list[str], *, version: int | None = None, filter: Any = None) -> pd.DataFrame:
    if version is not None and version < 0:
        from pipeline.schemas import arrow_schema

        schema = arrow_schema(name)
        return pa.schema([schema.field(c) for c in columns]).empty_table().to_pandas()
    return store.read_table(name, missing_ok=True, columns=columns, version=version, filter=filter).to_pandas()


def _controls(store: Any, version: int | None = None) -> pd.DataFrame:
    g = _read(store, "gold", ["image_id", "wnid"], version=version)
    return pd.DataFrame({"wnid": g["wnid"].astype(str).to_numpy(), "image_id": g["image_id"].astype(str).to_numpy()})


def _links(store: Any, version: int | None = None) -> pd.DataFrame:
    p = pairs_to_verify(_read(store, "image_links", LINK_COLUMNS, version=version))
    return pd.DataFrame({"wnid": p["wnid"].astype(str).to_numpy(), "image_id": p["image_id"].astype(str).to_numpy()})


def _diff_wnids(old: pd.DataFrame, new: pd.DataFrame) -> set[str]:
    a = pd.MultiIndex.from_frame(old[PAIR]) if len(old) else pd.MultiIndex.from_arrays([[], []], names=PAIR)
    b = pd.MultiIndex.from_frame(new[PAIR]) if len(new) else pd.MultiIndex.from_arrays([[], []], names=PAIR)
    return set(a.difference(b).get_level_values(0)) | set(b.difference(a).get_level_values(0))


@dataclass
class Changes:
    synsets: set[str] = field(default_factory=set)
    new_votes: pd.DataFrame = field(default_factory=pd.DataFrame)
    gold: pd.DataFrame = field(default_factory=lambda: Sources().gold)
    tasked: pd.DataFrame = field(default_factory=empty_pairs)
    links: pd.DataFrame | None = None
    controls: pd.DataFrame = field(default_factory=empty_pairs)
    why: dict[str, int] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)  # synsets whose links or controls changed: every pair re-decided


def _changes(store: Any, last: Round, versions: dict[str, int], asked: pd.DataFrame) -> Changes | None:
    """The synsets to re-decide since the last round, or None when the inputs' history is not readable."""
    out = Changes()
    if versions["votes_version"] != last.votes_version:
        nv = store.read_changes("votes", int(last.votes_version),
                                columns=["annotation_id", "image_id", "wnid", "worker", "submitted_at"])
        if nv is None:
            return None
        out.new_votes = nv.to_pandas()
        new = set(out.new_votes["wnid"])
        out.why["new votes"] = len(new)
        out.synsets |= new
    if versions["tasks_version"] != last.tasks_version:
        nt = store.read_changes("tasks", int(last.tasks_version), columns=TASK_COLUMNS)
        if nt is None:
            return None
        out.gold, out.tasked = gold_frame(nt.to_pandas())
        if len(out.gold):
            out.why["new gold tasks"] = len(set(out.gold["wnid"]) - out.synsets)
            out.synsets |= set(out.gold["wnid"])
    try:
        if versions["links_version"] != last.links_version:
            out.links = _links(store)
            changed = _diff_wnids(_links(store, int(last.links_version)), out.links)
            out.whole |= changed
            new = changed - out.synsets
            out.why["ingest links added or dropped"] = len(new)
            out.synsets |= new
        out.controls = _controls(store)
        if versions["gold_version"] != last.gold_version:
            changed = _diff_wnids(_controls(store, int(last.gold_version)), out.controls)
            out.whole |= changed
            new = changed - out.synsets
            out.why["controls added or dropped"] = len(new)
            out.synsets |= new
    except KeyError:  # MissingKey: the version the last round read was vacuumed
        return None
    cand = pd.concat([out.tasked.assign(_flag="tasked"), asked.assign(_flag="asked")], ignore_index=True)
    cand = cand[~cand["wnid"].isin(out.synsets)].drop_duplicates([*PAIR, "_flag"])
    if len(cand):
        known = _read(store, "qc_pairs", ["wnid", "image_id", "tasked", "asked"], version=int(last.pairs_version),
                      filter=[("wnid", "in", sorted(set(cand["wnid"])))])
        merged = cand.merge(known, on=PAIR, how="left")
        has = np.where(merged["_flag"] == "tasked", merged["tasked"].fillna(False).astype(bool),
                       merged["asked"].fillna(False).astype(bool))
        new = set(merged.loc[~has, "wnid"])
        out.why["new pairs"] = len(new)
        out.synsets |= new
    return out


def _round_row(number: int, state: str, mode: str, reason: str, method: str, digest: str, versions: dict[str, int],
               synsets: list[str] | None = None, base: dict[str, Any] | None = None, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "votes_total": 0, "votes_at_full": 0, "all_tasks": 0.0, "all_p": 0.0, "kept_tasks": 0.0, "kept_p": 0.0,
        "prior_source": "", "prior_mean": 0.0, "prior_strength": 0.0, "prior_reason": "", "class_note": "",
        "prior_yes": 0.5, "vote_step": 0.0, "calibration": Calibration().to_json(), "seconds": 0.0,
        **{c: -1 for c in OWN_VERSIONS.values()}}
    if base:
        row.update({k: v for k, v in base.items() if k in row})
    row.update(values)
    row.update(round=int(number), state=state, mode=mode, reason=reason, method=method, settings_digest=digest,
               at=datetime.now(UTC), synsets=synsets, **versions)
    return row


def _append_round(store: Any, row: dict[str, Any]) -> None:
    from pipeline.store import TableConflict

    added = store.append_table("qc_rounds", pd.DataFrame([row]), unique_by=["round", "state"])
    if added.num_rows == 0:
        raise TableConflict(f"QC round {row['round']} was {row['state']} by another QC run at the same time; "
                            "run one QC round at a time (the next round repairs the tables)")


def _model_values(fit: Any, calibration: Calibration) -> dict[str, Any]:
    t = fit.totals
    return {"all_tasks": t.all_tasks, "all_p": t.all_p, "kept_tasks": t.kept_tasks, "kept_p": t.kept_p,
            "prior_source": fit.prior.source, "prior_mean": float(fit.prior.mean), "prior_strength": float(fit.prior.strength),
            "prior_reason": fit.prior.reason, "class_note": fit.class_note, "prior_yes": fit.prior_yes,
            "vote_step": fit.step, "calibration": calibration.to_json(),
            "votes_total": int(round(float(t.n_votes.sum())))}


def _qc_workers_frame(codes: WorkerCodes, totals: Totals, last_vote: np.ndarray, fit: Any) -> pd.DataFrame:
    frame = totals.resized(len(codes)).to_frame()
    frame.insert(0, "code", np.arange(len(codes), dtype=np.int32))
    frame.insert(1, "worker", codes.names)
    frame.insert(2, "last_vote_at", pd.Series(np.asarray(last_vote, np.int64).view("datetime64[us]")).dt.tz_localize(UTC))
    used = fit.table["votes_used"].to_numpy(bool)
    frame["votes_used"] = np.concatenate([used, np.ones(len(codes) - len(used), dtype=bool)])
    return frame


def _merge_last_vote(last_vote: np.ndarray, block: Block) -> np.ndarray:
    codes, newest = block.last_vote
    if len(codes):
        n = max(len(last_vote), int(codes.max()) + 1)
        last_vote = np.concatenate([last_vote, np.full(n - len(last_vote), NEVER)])
        np.maximum.at(last_vote, codes, newest)
    return last_vote


# ----- the round ---------------------------------------------------------------------------------------------
def run_qc(store: Any, settings: Any, pairs: pd.DataFrame | None = None, method: str | None = None, *,
           full: bool = False, refit_growth: float | None = REFIT_GROWTH, spill_dir: str | None = None
           ) -> dict[str, Any]:
    """One QC round (see the module docstring): incremental unless `full`, nothing to build on, or a reason to
    refit; returns a summary dict (`qc_round` says which round it was and why). `method` overrides
    `settings.qc.method`; `pairs` (image_id, wnid) are planned even without votes (and kept by later rounds);
    `refit_growth` None never refits on growth alone; `spill_dir`: where a full refit spills its chunks."""
    t0 = time.perf_counter()
    qc = settings.qc
    method = check_method(method or qc.method)
    digest = settings_digest(qc, method)
    asked = _checked_pairs(pairs)
    last, pending, number = _rounds(store)
    versions, legacy = _input_versions(store)
    reason = None
    if full:
        reason = "asked (--full)"
    elif last is None:
        reason = "first round"
    elif pending is not None and pending.mode == "full":
        reason = f"round {pending.round}'s full refit did not finish"
    elif last.settings_digest != digest:
        reason = "qc settings or method changed"
    elif legacy:
        reason = f"single-object table(s) {legacy}: no history to read changes from"
    elif pending is None and not _state_intact(store, last):
        reason = "QC's tables were written outside a QC round"
    changes = None
    if reason is None:
        changes = _changes(store, last, versions, asked)
        if changes is None:
            reason = "the inputs' history since the last round is no longer readable (rewritten or vacuumed)"
    if reason is None and refit_growth is not None:
        total = int(last.votes_total) + len(changes.new_votes)
        if total > 0 and total >= refit_growth * int(last.votes_at_full):
            reason = (f"votes grew from {int(last.votes_at_full)} at the last full refit to about {total}"
                      f" (x{refit_growth:g} refits)")
    if reason is not None:
        return _full_round(store, settings, method, digest, asked, last, number, versions, reason, t0, spill_dir)
    assert last is not None and changes is not None
    synsets = set(changes.synsets) | set(pending.synset_list if pending is not None else [])
    changes.whole |= set(pending.synset_list if pending is not None else [])  # an unfinished round: all again
    if not synsets:
        return _unchanged_round(store, settings, method, digest, last, number, versions, changes, t0)
    why = ", ".join(f"{v} synset(s) with {k}" for k, v in changes.why.items() if v)
    if pending is not None:
        why = (why + "; " if why else "") + f"round {pending.round} did not finish"
    return _incremental_round(store, settings, method, digest, asked, last, number, versions, changes,
                              sorted(synsets), why, t0)


def _summary(store: Any, synsets: pd.DataFrame, workers: pd.DataFrame, team: Team, qc: Any, controls: int,
             method: str, info: dict[str, Any]) -> dict[str, Any]:
    out = summary_of(synsets, workers, team, qc, controls, method)
    out["qc_round"] = info
    return out


def _state_of(store: Any, last: Round) -> tuple[WorkerCodes, Totals, np.ndarray, np.ndarray]:
    """Worker codes, totals, flags (votes_used) and newest votes as the last done round left them."""
    qcw = _read(store, "qc_workers", [f.name for f in _schema("qc_workers")], version=int(last.qc_workers_version))
    qcw = qcw.sort_values("code", kind="stable").reset_index(drop=True)
    codes = WorkerCodes(qcw["worker"].astype(str).tolist())
    totals = Totals.from_frame(qcw, last.row)
    when = pd.to_datetime(qcw["last_vote_at"], utc=True)
    last_vote = when.to_numpy("datetime64[us]").view(np.int64).copy() if len(when) else np.zeros(0, dtype=np.int64)
    return codes, totals, qcw["votes_used"].to_numpy(bool), last_vote


def _schema(name: str) -> Any:
    from pipeline.schemas import arrow_schema

    return arrow_schema(name)


def _unchanged_round(store: Any, settings: Any, method: str, digest: str, last: Round, number: int,
                     versions: dict[str, int], changes: Changes, t0: float) -> dict[str, Any]:
    qc = settings.qc
    moved = any(versions[c] != last.row[c] for c in INPUTS.values())
    if moved:  # nothing to re-decide, but the watermark moves on
        row = _round_row(number, "done", "unchanged", "inputs moved, no synset to re-decide", method, digest, versions,
                         base=last.row, seconds=time.perf_counter() - t0)
        row["votes_at_full"] = last.votes_at_full
        for c in OWN_VERSIONS.values():
            row[c] = last.row[c]
        _append_round(store, row)
    synsets = _read(store, "qc_synsets", SYNSET_COLUMNS, version=int(last.synsets_version))
    workers = _read(store, "workers", WORKER_COLUMNS, version=int(last.workers_version))
    codes, _, _, last_vote = _state_of(store, last)
    team, _ = team_for(codes.names, last_vote, workers, qc)
    info = {"mode": "unchanged", "round": number if moved else int(last.round), "reason": "no new input" if not moved
            else "inputs moved, no synset to re-decide", "synsets": 0, "seconds": time.perf_counter() - t0}
    return _summary(store, synsets, workers, team, qc, len(changes.controls), method, info)


@dataclass
class _Incremental:
    """An incremental round computed, not written yet."""

    synsets: list[str]
    decided: Decided
    fit: Any
    codes: WorkerCodes
    last_vote: np.ndarray
    workers: pd.DataFrame
    team: Team
    calibration: Calibration
    pairs: int = 0  # pairs re-decided (the others of these synsets kept their rows)


def _votes_of(store: Any, synsets: list[str], read: dict[str, Any]) -> pa.Table:
    """The votes of `synsets`, reading only those of synsets `read` does not hold (`read`: the votes read earlier in
    the same round and their synsets; a re-decision widened to watched synsets does not read the table twice)."""
    have: set[str] = read.get("synsets", set())
    missing = sorted(set(synsets) - have)
    parts = []
    if have:
        held = read["votes"]
        if not have <= set(synsets):
            held = held.filter(pa.compute.is_in(held.column("wnid"), value_set=pa.array(sorted(have & set(synsets)))))
        parts.append(held)
    if missing or not parts:
        parts.append(store.read_table("votes", missing_ok=True, columns=VOTE_COLUMNS, filter=[("wnid", "in", missing)]))
    votes = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    read.update(synsets=set(synsets), votes=votes)
    return votes


# methods whose decision of a pair depends only on its own votes and the crowd-wide model: a round may re-decide
# just the pairs that changed (and the watched ones) in a synset; confidence-table's per-synset table and a
# per-synset vote budget need the whole synset
PAIRWISE_METHODS = ("adaptive-ds", "ds", "mv")
TEAM_COUNTS = ["needs_new_annotator", "small_team_accepted", "small_team_rejected", "team_capped_votes"]


def _pairwise_ok(settings: Any, method: str) -> bool:
    return method in PAIRWISE_METHODS and settings.qc.budget_per_synset is None


def _margin_of(store: Any, last: Round, read: dict[str, Any]) -> pa.Table | None:
    """qc_margin as the last done round left it (read once per round)."""
    if "margin" not in read:
        read["margin"] = (store.read_table("qc_margin", missing_ok=True, version=int(last.margin_version))
                          if int(last.margin_version) >= 0 else None)
    return read["margin"]


def _synsets_before(store: Any, last: Round, read: dict[str, Any]) -> pd.DataFrame:
    """qc_synsets as the last done round left it (read once per round)."""
    if "qc_synsets" not in read:
        read["qc_synsets"] = _read(store, "qc_synsets", SYNSET_COLUMNS, version=int(last.synsets_version))
    return read["qc_synsets"]


def _images_to_redecide(store: Any, last: Round, changes: Changes, asked: pd.DataFrame, synsets: list[str],
                        read: dict[str, Any]) -> np.ndarray:
    """The images whose pairs in `synsets` a pairwise round re-decides: those with new votes, new gold or pushed
    tasks or asked by hand, and the watched ones (near a threshold when last decided, so the updated model may
    move them). Every other pair of those synsets keeps its rows: its votes did not change, and a model change
    that could move it would first have put it near a threshold."""
    in_s = lambda f: f.loc[f["wnid"].isin(synsets), "image_id"]  # noqa: E731
    parts = [in_s(changes.new_votes) if len(changes.new_votes) else pd.Series(dtype=object),
             in_s(changes.gold), in_s(changes.tasked), in_s(asked)]
    margin = _margin_of(store, last, read)
    if margin is not None and margin.num_rows:
        inside = pa.compute.is_in(margin.column("wnid"), value_set=pa.array(synsets, pa.string()))
        parts.append(pd.Series(margin.column("image_id").filter(inside).to_numpy(zero_copy_only=False)))
    return np.asarray(pd.unique(pd.concat(parts, ignore_index=True).astype(str)), dtype=object)


def _chosen(wnid: Any, image: Any, whole: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Rows re-decided: every row of the `whole` synsets, and the rows of `images` (a pair is named by its image:
    another synset's pair of such an image is re-decided too, which changes nothing). Columns as Arrow arrays or
    pandas Series (hashed membership tests: numpy's isin on strings sorts)."""
    def member(col: Any, values: np.ndarray) -> np.ndarray:
        if not len(values):
            return np.zeros(len(col), dtype=bool)
        if isinstance(col, pa.ChunkedArray | pa.Array):
            return pa.compute.is_in(col, value_set=pa.array(values, pa.string())).to_numpy(zero_copy_only=False)
        return pd.Series(col).isin(values).to_numpy()

    return member(wnid, whole) | member(image, images)


def _restrict_pairs(frame: pd.DataFrame, whole: np.ndarray, images: np.ndarray) -> pd.DataFrame:
    return frame[_chosen(frame["wnid"], frame["image_id"], whole, images)] if len(frame) else frame


def _merged(old: pd.DataFrame, new: pd.DataFrame, whole: np.ndarray, images: np.ndarray) -> pd.DataFrame:
    """A synsets' rows after a pairwise round: the old rows not re-decided, then the new ones, in pair order."""
    keep = old[~_chosen(old["wnid"], old["image_id"], whole, images)] if len(old) else old
    out = pd.concat([keep, new], ignore_index=True) if len(keep) else new
    return out.sort_values(PAIR, kind="stable").reset_index(drop=True)


def _redecide(store: Any, settings: Any, method: str, asked: pd.DataFrame, last: Round, number: int,
              changes: Changes, synsets: list[str], read: dict[str, Any] | None = None,
              whole: set[str] | frozenset[str] = frozenset()) -> _Incremental | None:
    """Re-decide `synsets` against the rest of the crowd as the last done round left it; None when qc_pairs does
    not match the votes (then only a full refit can be trusted). `read`: what this round already read. With a
    pairwise method, only the pairs `_images_to_redecide` names are re-decided in the synsets outside `whole`
    (the others keep their rows); in `whole` (links or controls changed, a round left unfinished, a team too
    small to take for granted) every pair is."""
    qc = settings.qc
    params = params_from_settings(qc)
    read = {} if read is None else read
    flt = [("wnid", "in", synsets)]
    votes = _votes_of(store, synsets, read)
    state = _read(store, "qc_pairs", STATE_COLUMNS, version=int(last.pairs_version), filter=flt)
    if _pairwise_ok(settings, method) and not set(synsets) <= set(whole):
        # a synset decided with a small team may hold small-team labels a grown team reopens: all of it again
        before = _synsets_before(store, last, read)
        had_team = before.loc[before["wnid"].isin(synsets) & (before[TEAM_COUNTS].sum(axis=1) > 0), "wnid"]
        whole_arr = np.array(sorted(set(whole) | set(had_team)), dtype=object)
        images = _images_to_redecide(store, last, changes, asked, synsets, read)
        rows = _chosen(votes.column("wnid"), votes.column("image_id"), whole_arr, images)
        votes = votes.filter(pa.array(rows))
        state_all = state
        state = _restrict_pairs(state, whole_arr, images).reset_index(drop=True)
    else:
        whole_arr, images, state_all = np.array(sorted(synsets), dtype=object), np.zeros(0, dtype=object), state
    nv = changes.new_votes
    is_new = np.zeros(votes.num_rows, dtype=bool)
    if len(nv) and votes.num_rows:  # a row's key: annotation, image and submitted_at (an edit is a new row)
        have = pd.MultiIndex.from_arrays([nv["annotation_id"].to_numpy(), nv["image_id"].astype(str).to_numpy(),
                                          _micros(nv["submitted_at"])])
        # only rows whose annotation id is new can be new: the full key is built for those alone
        maybe = np.flatnonzero(np.isin(votes.column("annotation_id").to_numpy(), nv["annotation_id"].to_numpy()))
        if len(maybe):
            sub = votes.take(pa.array(maybe))
            is_new[maybe] = pd.MultiIndex.from_arrays([sub.column("annotation_id").to_numpy(),
                                                       sub.column("image_id").to_numpy(zero_copy_only=False),
                                                       _micros(sub.column("submitted_at"))]).isin(have)
    codes, totals_v, keep_v, last_vote = _state_of(store, last)
    pick = lambda f: _restrict_pairs(f[f["wnid"].isin(synsets)], whole_arr, images)  # noqa: E731
    old_gold = state.loc[state["gold_answer"].notna(), [*PAIR, "gold_answer"]]
    sources = Sources(gold=pd.concat([old_gold, pick(changes.gold)], ignore_index=True),
                      tasked=pd.concat([state.loc[state["tasked"], PAIR], pick(changes.tasked)], ignore_index=True),
                      linked=pick(changes.links) if changes.links is not None else state.loc[state["linked"], PAIR],
                      asked=pd.concat([state.loc[state["asked"], PAIR], pick(asked)], ignore_index=True),
                      controls=pick(changes.controls))
    # the block, and what these pairs gave the model last time: their old votes (with the posteriors qc_pairs kept)
    block, old = Block.with_earlier(votes, codes, sources.pairs(), ~is_new)
    flags = flags_of(block.pairs, sources)
    n_workers = len(codes)
    pos = pd.MultiIndex.from_frame(state[PAIR]).get_indexer(pd.MultiIndex.from_frame(block.pairs[PAIR])) if len(state) \
        else np.full(block.n_tasks, -1)
    found = pos >= 0

    def take(col: str, fill: Any) -> np.ndarray:
        if not len(state):
            return np.full(block.n_tasks, fill)
        return np.where(found, state[col].to_numpy()[np.maximum(pos, 0)], fill)

    if (np.bincount(old.task, minlength=block.n_tasks) != take("n_votes", 0).astype(np.int64)).any():
        return None
    old_answer = take("gold_answer", None)
    old_gold = np.where(pd.isna(old_answer), -1, np.where(old_answer == YES, 1, 0)).astype(np.int64)
    n_ok_old, n_kept_old = take("n_ok", 0).astype(np.int64), take("n_kept", 0).astype(np.int64)
    keep_old = np.concatenate([keep_v, np.ones(n_workers - len(keep_v), dtype=bool)])
    old_contrib = block_totals(Chunks.of(old.task, old.worker, old.label, block.n_tasks, n_workers), old_gold,
                               take("p_all", 0.5).astype(np.float64), take("p_kept", 0.5).astype(np.float64), keep_old,
                               n_ok_old > 0, n_kept_old > 0)
    rest = totals_v.resized(n_workers) - old_contrib
    fit = fit_model(Chunks.of(block.task, block.worker, block.label, block.n_tasks, n_workers), flags.gold, params,
                    rest, codes.names)
    workers = _workers_table(fit)
    last_vote = _merge_last_vote(np.concatenate([last_vote, np.full(n_workers - len(last_vote), NEVER)]), block)
    team, team_qc = team_for(codes.names, last_vote, workers, qc)
    if len(images) and team.known and len(team.members) < qc.max_votes_per_image:
        # a team this small may cap or decide pairs by who is left to ask: every pair of these synsets again
        return _redecide(store, settings, method, asked, last, number, changes, synsets, read, whole=set(synsets))
    calibration = Calibration.from_json(last.calibration).combine(
        Calibration.of(take("n_ok_yes", 0).astype(np.int64), n_ok_old, old_gold, qc.max_votes_per_image), -1.0
    ).combine(Calibration.of(fit.n_ok_yes, fit.n_ok, flags.gold, qc.max_votes_per_image), 1.0)
    ctx = Context(method, params, qc, fit.step, fit.prior_yes, workers, codes.names, team, team_qc, calibration, number)
    decided = decide_block(block, flags, fit, ctx)
    if len(images):
        decided = _merge_decided(store, last, read, synsets, decided, state_all, whole_arr, images, number)
    return _Incremental(synsets, decided, fit, codes, last_vote, workers, team, calibration, block.n_tasks)


def _merge_decided(store: Any, last: Round, read: dict[str, Any], synsets: list[str], d: Decided,
                   state: pd.DataFrame, whole: np.ndarray, images: np.ndarray, number: int) -> Decided:
    """The synsets' whole rows after a pairwise re-decision: the re-decided pairs' new rows over the old rows."""
    flt = [("wnid", "in", synsets)]
    labels = _merged(_read(store, "labels", LABEL_COLUMNS, version=int(last.labels_version), filter=flt),
                     d.labels, whole, images)[LABEL_COLUMNS]
    plan = _merged(_read(store, "push_plan", PLAN_COLUMNS, version=int(last.push_plan_version), filter=flt),
                   d.plan, whole, images)[PLAN_COLUMNS]
    state = _merged(state, d.state, whole, images)[STATE_COLUMNS]
    margin_old = _margin_of(store, last, read)
    if margin_old is not None and margin_old.num_rows:
        margin_old = margin_old.filter(pa.compute.is_in(margin_old.column("wnid"), value_set=pa.array(synsets, pa.string())))
        keep = ~_chosen(margin_old.column("wnid"), margin_old.column("image_id"), whole, images)
        margin = pa.concat_tables([margin_old.filter(pa.array(keep)).cast(MARGIN_SCHEMA), d.margin])
    else:
        margin = d.margin
    margin = margin.sort_by([("wnid", "ascending"), ("image_id", "ascending")])
    synsets_rows = synset_rows(labels, plan, state, d.team_per_wnid, number)
    return Decided(labels, plan, state, synsets_rows, d.team, margin, d.team_per_wnid)


def _micros(column: Any) -> np.ndarray:
    """Timestamps (an Arrow column or a pandas Series) as int64 microseconds since the epoch."""
    if isinstance(column, pd.Series):
        return pd.to_datetime(column, utc=True).to_numpy("datetime64[us]").view(np.int64)
    return pa.compute.cast(column, pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()


def _watch(store: Any, last: Round, done: _Incremental, settings: Any, method: str, read: dict[str, Any]) -> set[str]:
    """Synsets outside the round whose watched pairs (near a threshold when last decided) would now change status
    under the worker model the round just updated."""
    margin = _margin_of(store, last, read)
    if margin is None or not margin.num_rows:
        return set()
    wnids = margin.column("wnid").to_numpy(zero_copy_only=False)
    outside = ~np.isin(wnids, np.array(done.synsets, dtype=object))
    if not outside.any():
        return set()
    margin = margin.filter(pa.array(outside))
    status = rescore(margin, done.fit, params_from_settings(settings.qc), method, settings.qc)
    moved = status != margin.column("status").to_numpy(zero_copy_only=False)
    return set(margin.column("wnid").to_numpy(zero_copy_only=False)[moved].tolist())


def _incremental_round(store: Any, settings: Any, method: str, digest: str, asked: pd.DataFrame, last: Round,
                       number: int, versions: dict[str, int], changes: Changes, synsets: list[str], why: str,
                       t0: float) -> dict[str, Any]:
    qc = settings.qc
    read: dict[str, Any] = {}
    whole = changes.whole
    done = _redecide(store, settings, method, asked, last, number, changes, synsets, read, whole)
    if done is not None:
        # the model moved: synsets nobody voted on whose pairs near a threshold would now be decided otherwise
        moved = _watch(store, last, done, settings, method, read)
        if moved:
            budget = max(1, int(WATCH_SHARE * len(synsets)))
            take = sorted(moved)[:budget]
            why += f"; {len(take)} synset(s) with a watched pair the updated model decides otherwise"
            if len(moved) > len(take):
                why += f" ({len(moved) - len(take)} more next round)"
            synsets = sorted(set(synsets) | set(take))
            done = _redecide(store, settings, method, asked, last, number, changes, synsets, read, whole)
    if done is None:
        return _full_round(store, settings, method, digest, asked, last, number, versions,
                           "qc_pairs does not match the votes it was computed from", t0, None)
    before = _synsets_before(store, last, read)
    synset_rows = pd.concat([before[~before["wnid"].isin(synsets)], done.decided.synsets], ignore_index=True)
    synset_rows = synset_rows.sort_values("wnid", kind="stable").reset_index(drop=True)
    _append_round(store, _round_row(number, "started", "incremental", why, method, digest, versions, synsets))
    d = done.decided
    out = {"labels_version": store.replace_rows("labels", d.labels, column="wnid", values=synsets),
           "push_plan_version": store.replace_rows("push_plan", d.plan, column="wnid", values=synsets),
           "pairs_version": store.replace_rows("qc_pairs", d.state, column="wnid", values=synsets),
           "margin_version": store.replace_rows("qc_margin", d.margin, column="wnid", values=synsets)}
    out.update(_write_small(store, synset_rows, _qc_workers_frame(done.codes, done.fit.totals, done.last_vote, done.fit),
                            done.workers))
    row = _round_row(number, "done", "incremental", why, method, digest, versions, synsets, base=last.row,
                     **_model_values(done.fit, done.calibration), **out)
    row["votes_at_full"] = int(last.votes_at_full)
    row["seconds"] = time.perf_counter() - t0
    _append_round(store, row)
    info = {"mode": "incremental", "round": number, "reason": why, "synsets": len(synsets), "pairs": done.pairs,
            "seconds": row["seconds"]}
    return _summary(store, synset_rows, done.workers, done.team, qc, len(changes.controls), method, info)


def _known_synsets(store: Any, last: Round) -> pd.DataFrame:
    return _read(store, "qc_synsets", ["wnid"], version=int(last.synsets_version))


def _write_small(store: Any, synsets: pd.DataFrame, qc_workers: pd.DataFrame, workers: pd.DataFrame) -> dict[str, int]:
    store.write_table("qc_synsets", synsets)
    store.write_table("qc_workers", qc_workers)
    store.write_table("workers", workers)
    return {"synsets_version": int(store.table_version("qc_synsets")),
            "qc_workers_version": int(store.table_version("qc_workers")),
            "workers_version": int(store.table_version("workers"))}


def _batches(counts: pd.Series, wnids: list[str], size: int) -> list[list[str]]:
    """Consecutive wnids (sorted) in batches of about `size` votes."""
    out: list[list[str]] = []
    cur: list[str] = []
    n = 0
    for w in wnids:
        c = int(counts.get(w, 0))
        if cur and n + c > size:
            out.append(cur)
            cur, n = [], 0
        cur.append(w)
        n += c
    if cur:
        out.append(cur)
    return out


def _full_round(store: Any, settings: Any, method: str, digest: str, asked: pd.DataFrame, last: Round | None,
                number: int, versions: dict[str, int], reason: str, t0: float, spill_dir: str | None) -> dict[str, Any]:
    qc = settings.qc
    params = params_from_settings(qc)
    gold, tasked = gold_frame(_read(store, "tasks", TASK_COLUMNS))
    if last is not None and int(last.pairs_version) >= 0:
        kept = _read(store, "qc_pairs", PAIR, version=int(last.pairs_version), filter=[("asked", "=", True)])
        asked = pd.concat([kept, asked], ignore_index=True)
    controls = _controls(store)
    sources = Sources(gold=gold, tasked=tasked, linked=_links(store), asked=asked, controls=controls)
    vc = pa.compute.value_counts(store.read_table("votes", missing_ok=True, columns=["wnid"]).column("wnid").combine_chunks())
    counts = pd.Series(vc.field("counts").to_numpy(), index=vc.field("values").to_numpy(zero_copy_only=False), dtype=np.int64)
    wnids = sorted(set(counts.index.astype(str)) | sources.wnids())
    if last is not None:
        codes, _, _, last_vote = _state_of(store, last)
    else:
        codes, last_vote = WorkerCodes([]), np.zeros(0, dtype=np.int64)
    folder = Path(tempfile.mkdtemp(prefix="sf-qc-full-", dir=spill_dir))
    try:
        chunks = SpilledChunks(folder / "chunks")
        golds, offsets = [], []
        batches = _batches(counts, wnids, BATCH_VOTES)
        for i, batch in enumerate(batches):
            votes = (store.read_table("votes", columns=VOTE_COLUMNS, filter=[("wnid", "in", batch)])
                     if counts.reindex(batch).fillna(0).sum() else None)
            src = sources.restrict(batch)
            block = Block.from_votes(votes if votes is not None else as_votes_table(None), codes, src.pairs())
            flags = flags_of(block.pairs, src)
            offsets.append(chunks.n_tasks)
            chunks.add(block.task, block.worker, block.label, block.n_tasks)
            golds.append(flags.gold)
            last_vote = _merge_last_vote(last_vote, block)
            with open(folder / f"block-{i:05d}.pkl", "wb") as fh:
                pickle.dump((block, flags), fh, protocol=pickle.HIGHEST_PROTOCOL)
            del votes, block
        chunks.n_workers = len(codes)
        last_vote = np.concatenate([last_vote, np.full(len(codes) - len(last_vote), NEVER)])
        gold_all = np.concatenate(golds) if golds else np.zeros(0, dtype=np.int64)
        fit = fit_model(chunks, gold_all, params, None, codes.names)
        workers = _workers_table(fit)
        team, team_qc = team_for(codes.names, last_vote, workers, qc)
        calibration = Calibration.of(fit.n_ok_yes, fit.n_ok, gold_all, qc.max_votes_per_image)
        ctx = Context(method, params, qc, fit.step, fit.prior_yes, workers, codes.names, team, team_qc, calibration,
                      number)
        synset_rows = []
        for i, off in enumerate(offsets):
            with open(folder / f"block-{i:05d}.pkl", "rb") as fh:
                block, flags = pickle.load(fh)
            decided = decide_block(block, flags, fit, ctx, slice(off, off + block.n_tasks))
            for name, frame in (("labels", decided.labels), ("push_plan", decided.plan), ("qc_pairs", decided.state),
                                ("qc_margin", decided.margin)):
                with open(folder / f"{name}-{i:05d}.pkl", "wb") as fh:
                    pickle.dump(frame, fh, protocol=pickle.HIGHEST_PROTOCOL)
            synset_rows.append(decided.synsets)

        def parts(name: str) -> Any:
            for i in range(len(offsets)):
                with open(folder / f"{name}-{i:05d}.pkl", "rb") as fh:
                    yield pickle.load(fh)

        _append_round(store, _round_row(number, "started", "full", reason, method, digest, versions))
        out = {OWN_VERSIONS[name] if name in OWN_VERSIONS else f"{name}_version":
               store.replace_rows(name, parts(name), column="wnid", values=None) for name in LAYOUT_TABLES}
        synsets = (pd.concat(synset_rows, ignore_index=True) if synset_rows else pd.DataFrame(columns=SYNSET_COLUMNS))
        out.update(_write_small(store, synsets, _qc_workers_frame(codes, fit.totals, last_vote, fit), workers))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    values = _model_values(fit, calibration)
    row = _round_row(number, "done", "full", reason, method, digest, versions, None, **values, **out)
    row["votes_at_full"] = values["votes_total"]
    row["seconds"] = time.perf_counter() - t0
    _append_round(store, row)
    info = {"mode": "full", "round": number, "reason": reason, "synsets": len(wnids), "seconds": row["seconds"],
            "batches": len(offsets)}
    return _summary(store, synsets, workers, team, qc, len(controls), method, info)


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


_ = (Flags, STATE_COLUMNS)  # re-exported names used by tests and benchmarks
