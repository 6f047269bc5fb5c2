"""Pull: annotations from Label Studio into the append-only `votes` table, exactly once, costing what is new.

Each project of the `projects` table that is not archived is asked only for its tasks changed since its watermark
(the newest task change the previous pull read, on the server's clock, less `crowd.pull_lag_s` so an annotation
saved while that pull ran is read again rather than missed): a Data Manager listing of task ids filtered on
`updated_at` (Label Studio bumps a task's `updated_at` whenever one of its annotations is created or changed),
then the JSON export of just those tasks. Rows are appended with `append_table(unique_by=...)`, so an
annotation read twice adds nothing and no set of every id is held in memory; the watermark is written after the
rows, so a crash in between loses nothing and duplicates nothing (the next pull reads the same changes again).

An annotation edited after it was pulled adds a row with the same annotation id, the new answer and the edit time
as `submitted_at` (only for the images whose answer changed); `votes` keeps what every worker answered and when,
and QC (`pipeline.qc.stage.clean_votes`) takes the latest answer per annotation and per worker and pair, as it
does for a worker who answers a pair twice: the worker's corrected answer is the one that counts, and the first
one stays on record. An edit into an unexpected shape is quarantined and the earlier answer stands.

A full project (crowd.project_size tasks) with no open task is archived after one more pull and is no longer
asked. Cancelled (skipped) annotations are not votes. Worker ids are replaced by a keyed hash (HMAC-SHA256 with
the `crowd.pseudonym_key` secret) of the account's email before they reach any table. An annotation whose result
has an unexpected shape is quarantined with its id and the reason; it never stops the pull.

    >>> pseudonym("alice@example.org", b"k")
    'w-29beb0c88d8a4959'
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from crowd.client import CrowdClient, task_filter
from crowd.gold import worker_gold
from crowd.kinds import KINDS, TASK_COLUMNS, BadAnnotation
from pipeline.errors import UserError
from pipeline.store import Store

log = logging.getLogger("synsetforge.crowd")

VOTE_COLUMNS = ["annotation_id", "task_id", "image_id", "wnid", "worker", "answer", "is_gold", "lead_time_s",
                "submitted_at"]
QUARANTINE_COLUMNS = ["annotation_id", "task_id", "project_id", "worker", "reason", "result_json", "quarantined_at"]


class PseudonymKeyMissing(UserError):
    pass


def pseudonym(identity: str, key: bytes) -> str:
    """Keyed hash of a worker identity: stable for one key, not reversible without it."""
    return "w-" + hmac.new(key, identity.strip().lower().encode(), hashlib.sha256).hexdigest()[:16]


def pseudonym_key(settings: Any) -> bytes:
    secret = settings.crowd.pseudonym_key
    if secret is None or not secret.get_secret_value():
        raise PseudonymKeyMissing(
            "crowd.pseudonym_key is not set: export SYNSETFORGE__CROWD__PSEUDONYM_KEY (a long random secret; keep it "
            "stable, changing it changes every worker's pseudonym)"
        )
    return secret.get_secret_value().encode()


def _ts(text: Any) -> datetime:
    if not text:
        return datetime.now(UTC)
    t = pd.Timestamp(text)
    return (t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")).to_pydatetime()


def annotations_to_votes(
    export: list[dict[str, Any]],
    *,
    project_id: int,
    tasks: pd.DataFrame,
    seen: set[int] | frozenset[int] = frozenset(),
    worker_of: dict[int, str],
    key: bytes,
    default_kind: str = "verify",
    previous: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pure core of pull: (new vote rows, new quarantine rows) from exported tasks.

    `previous`: the vote rows already held for these annotations (annotation_id, image_id, answer, submitted_at).
    An annotation with none gives its rows with `submitted_at` = its creation time; one that has rows gives a row
    only for an image whose latest answer differs, with `submitted_at` = the annotation's update time (an edit).
    Ids in `seen` are skipped."""
    by_task: dict[int, dict[str, Any]] = {}
    by_image: dict[tuple[int, str], dict[str, Any]] = {}  # a grid task has one tasks row per image
    for r in tasks.to_dict("records") if len(tasks) else []:
        by_task.setdefault(int(r["task_id"]), r)
        by_image[(int(r["task_id"]), r["image_id"])] = r
    held: dict[tuple[int, str], str] = {}
    held_ids: set[int] = set()
    if previous is not None and len(previous):
        last = previous.sort_values("submitted_at", kind="stable").drop_duplicates(["annotation_id", "image_id"],
                                                                                   keep="last")
        held = dict(zip(zip(last["annotation_id"].astype("int64"), last["image_id"], strict=True), last["answer"],
                        strict=True))
        held_ids = set(last["annotation_id"].astype("int64"))
    votes, quarantine = [], []
    now = datetime.now(UTC)
    for task in export:
        task_id = int(task["id"])
        data = task.get("data") or {}
        rec = by_task.get(task_id)
        for ann in task.get("annotations") or []:
            ann_id = ann.get("id")
            if ann_id is None or int(ann_id) in seen:
                continue
            ann_id = int(ann_id)
            if ann.get("was_cancelled"):
                continue
            who = ann.get("completed_by")
            uid = who.get("id") if isinstance(who, dict) else who
            email = who.get("email") if isinstance(who, dict) else None
            if not email and uid is not None:
                email = worker_of.get(int(uid), f"ls-user-{uid}")
            worker = pseudonym(email, key) if email else None

            reason, answers = _interpret(ann, data, rec, worker, default_kind)
            if reason is None and any(i is not None and (task_id, i) not in by_image for i, _ in answers):
                stray = [i for i, _ in answers if i is not None and (task_id, i) not in by_image]
                reason = f"answer for image(s) {stray[:3]} that the tasks table does not list for task {task_id}"
            if reason is not None:
                quarantine.append({"annotation_id": ann_id, "task_id": task_id, "project_id": project_id,
                                   "worker": worker, "reason": reason,
                                   "result_json": json.dumps(ann.get("result"), default=str)[:4096],
                                   "quarantined_at": now})
                continue
            lead = ann.get("lead_time")
            edited = ann_id in held_ids
            for image_id, answer in answers:
                r = rec if image_id is None else by_image[(task_id, image_id)]
                if edited and held.get((ann_id, r["image_id"])) == answer:
                    continue  # read again (the watermark's lag, or another change to the task): nothing new
                when = ann.get("updated_at") or ann.get("created_at") if edited else ann.get("created_at")
                votes.append({"annotation_id": ann_id, "task_id": task_id, "image_id": r["image_id"],
                              "wnid": r["wnid"], "worker": worker, "answer": answer, "is_gold": bool(r["is_gold"]),
                              "lead_time_s": float(lead) if lead is not None else None,
                              "submitted_at": _ts(when)})
    return (pd.DataFrame(votes, columns=VOTE_COLUMNS), pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS))


def _interpret(ann: dict[str, Any], data: dict[str, Any], rec: dict[str, Any] | None, worker: str | None,
               default_kind: str) -> tuple[str | None, list[tuple[str | None, str]]]:
    """(quarantine reason, []) or (None, answers) for one annotation."""
    if worker is None:
        return "annotation has no completed_by user", []
    if rec is None:
        return "task is not in the tasks table (not pushed by synsetforge, or push not reconciled yet)", []
    kind = KINDS.get(rec.get("kind") or data.get("kind") or default_kind)
    if kind is None:
        return f"unknown task kind {rec.get('kind')!r}", []
    try:
        answers = kind.parse(ann.get("result"), data)
    except BadAnnotation as exc:
        return str(exc), []
    if not answers:
        return "the result holds no answer", []
    return None, answers


def identity(user: dict[str, Any]) -> str | None:
    """What a worker's pseudonym hashes: the account's email (or username); None for an account Label Studio lists
    masked ("Deleted": taken out of the organization), whose email the admin can no longer see."""
    email = (user.get("email") or "").strip()
    if email == "Deleted" and (user.get("username") or "") == "Deleted":
        return None
    return email or user.get("username") or f"ls-user-{user['id']}"


def user_emails(client: CrowdClient) -> dict[int, str]:
    out: dict[int, str] = {}
    for u in client.list_users():
        who = identity(u)
        if who is None:  # annotations of a removed member get a pseudonym of their own, not a shared "Deleted" one
            log.warning("Label Studio masks account %s (removed from the organization): its annotations are pulled "
                        "under the pseudonym of ls-user-%s", u["id"], u["id"])
            who = f"ls-user-{u['id']}"
        out[int(u["id"])] = who
    return out


def accounts(client: CrowdClient, key: bytes) -> pd.DataFrame:
    """worker pseudonym -> Label Studio account (user_id, email), for the admin only: it needs the admin token and the
    pseudonym key, and is never written to a table. Pseudonyms are made from the same identity pull uses."""
    rows = [{"worker": pseudonym(who, key), "user_id": uid, "email": who} for uid, who in user_emails(client).items()]
    return pd.DataFrame(rows, columns=["worker", "user_id", "email"])


VOTE_KEY = ["annotation_id", "image_id", "submitted_at"]  # an edit is a new row: same annotation, later time


def latest_votes(votes: pd.DataFrame) -> pd.DataFrame:
    """One row per (annotation, image): the latest answer (an edited annotation has several rows)."""
    if votes.empty:
        return votes
    v = votes.sort_values(["annotation_id", "submitted_at"], kind="stable")
    return v.drop_duplicates(["annotation_id", "image_id"], keep="last").reset_index(drop=True)


def _ids_filter(column: str, ids: list[int]) -> list[tuple[str, str, Any]]:
    """A filter on an id column that lets the store skip data files by their statistics (ids grow over time)."""
    return [(column, ">=", int(min(ids))), (column, "<=", int(max(ids)))]


def _rows_for(store: Store, name: str, column: str, ids: list[int], columns: list[str] | None = None) -> pd.DataFrame:
    if not ids or not store.has_table(name):
        return pd.DataFrame(columns=columns or [])
    t = store.read_table(name, columns=columns, filter=_ids_filter(column, ids)).to_pandas()
    return t[t[column].isin(set(ids))]


def changed_tasks(client: CrowdClient, project_id: int, since: datetime | None) -> tuple[list[int], datetime | None]:
    """(ids, newest updated_at) of a project's tasks changed after `since` (all tasks when None): one light Data
    Manager listing filtered on `updated_at` (see `CrowdClient.iter_filtered_tasks`)."""
    filters = [task_filter("updated_at", "greater", since, "Datetime")] if since is not None else []
    ids, newest = [], None
    for t in client.iter_filtered_tasks(project_id, filters):
        ids.append(int(t["id"]))
        at = _ts(t.get("updated_at")) if t.get("updated_at") else None
        if at is not None and (newest is None or at > newest):
            newest = at
    return ids, newest


def pull_projects(store: Store, client: CrowdClient, settings: Any, project_ids: list[int] | None,
                  kinds: list[str] | None) -> pd.DataFrame:
    """The projects table (synced with the server) with a `pull` column: the rows to pull now. `kinds`: every
    project of those kinds that is not archived; `project_ids`: those projects and every other live project of
    their kinds (a project given by id that the table does not know is added); neither: every live project."""
    from crowd.provision import active_projects, sync_projects
    from crowd.push import _register

    table = sync_projects(client, store, settings)
    ids = [int(p) for p in project_ids or []]
    for pid in ids:
        table = _register(client, settings, table, pid, "verify")
    if kinds is None and ids:
        kinds = sorted(set(table.loc[table["project_id"].isin(ids), "kind"]))
    live = active_projects(table, kinds)
    want = set(live["project_id"].astype("int64")) | set(ids)
    return table.assign(pull=table["project_id"].isin(want))


def pull(store: Store, client: CrowdClient, settings: Any, *, project_ids: list[int] | None = None,
         kinds: list[str] | None = None) -> dict[str, Any]:
    """Pull the projects `pull_projects` picks; append votes/quarantine; recompute `worker_gold`; advance each
    project's watermark and archive the finished ones (the `projects` table). Returns counts."""
    from crowd.provision import ARCHIVED, FULL, write_projects

    t0 = time.perf_counter()
    key = pseudonym_key(settings)
    lag = pd.Timedelta(seconds=settings.crowd.pull_lag_s)
    table = pull_projects(store, client, settings, project_ids, kinds)
    worker_of: dict[int, str] | None = None
    n_votes = n_quar = n_seen = n_edits = 0
    archived, pulled = [], []
    for i in table.index[table["pull"]]:
        row = table.loc[i]
        pid = int(row["project_id"])
        # A full project with no open task gets no new annotation once this pull has read it: archive it after.
        finished = row["state"] == FULL and client.count_tasks(
            pid, [task_filter("is_labeled", "equal", False, "Boolean")]) == 0
        mark = row["watermark"]
        since = None if pd.isna(mark) else (pd.Timestamp(mark) - lag).to_pydatetime()
        ids, newest = changed_tasks(client, pid, since)
        if ids:
            export = client.export_tasks(pid, ids)
            ann_ids = [int(a["id"]) for t in export for a in t.get("annotations") or [] if a.get("id") is not None]
            n_seen += len(ann_ids)
            tasks = _rows_for(store, "tasks", "task_id", ids)
            previous = _rows_for(store, "votes", "annotation_id", ann_ids,
                                 ["annotation_id", "image_id", "answer", "submitted_at"])
            if worker_of is None:
                worker_of = user_emails(client)
            v, q = annotations_to_votes(export, project_id=pid, tasks=tasks, worker_of=worker_of, key=key,
                                        previous=previous)
            if len(q):
                q = store.append_table("quarantine", q.drop_duplicates("annotation_id"),
                                       unique_by="annotation_id").to_pandas()
                if len(q):
                    log.warning("quarantined %d annotation(s) of project %s: %s", len(q), pid,
                                q["reason"].value_counts().to_dict())
            if len(v):
                edits = int(v["annotation_id"].isin(set(previous["annotation_id"])).sum()) if len(previous) else 0
                added = store.append_table("votes", v, unique_by=VOTE_KEY)
                n_votes += added.num_rows
                n_edits += min(edits, added.num_rows)
            n_quar += len(q)
        now = pd.Timestamp.now(tz="UTC").floor("us")
        if newest is not None:
            table.loc[i, "watermark"] = max(pd.Timestamp(newest), mark) if not pd.isna(mark) else pd.Timestamp(newest)
        table.loc[i, ["pulled_at", "updated_at"]] = [now, now]
        if finished:
            table.loc[i, "state"] = ARCHIVED
            archived.append(pid)
            log.info("project %s (%s) is finished and fully pulled: archived", pid, row["title"])
        pulled.append(pid)
    write_projects(store, table.drop(columns="pull"))  # after the rows: a crash before it rereads, dedupes
    total = None
    if n_votes or not store.has_table("worker_gold"):
        cs = settings.crowd
        rows = _table(store, "votes", VOTE_COLUMNS, ["annotation_id", "task_id", "image_id", "worker", "answer",
                                                     "is_gold", "submitted_at"])
        votes = latest_votes(rows)
        # Only gold tasks carry an answer. (A filter on the bool is_gold column reads no rows from these tables:
        # their row-group statistics for booleans make pyarrow skip every group.)
        gold_tasks = _table(store, "tasks", TASK_COLUMNS, ["task_id", "image_id", "gold_answer"],
                            filter=[("gold_answer", "in", ["yes", "no"])])  # the gold tasks (see below)
        store.write_table("worker_gold", worker_gold(votes, gold_tasks, min_n=cs.gold_min_n,
                                                     min_accuracy=cs.gold_min_accuracy))
        total = len(rows)
    if total is None:
        total = store.read_table("votes", columns=["annotation_id"], missing_ok=True).num_rows
    return {"new_votes": n_votes, "edited": n_edits, "quarantined": n_quar, "annotations_seen": n_seen,
            "total_votes": int(total), "projects": len(pulled), "archived": archived,
            "seconds": round(time.perf_counter() - t0, 3)}


def _table(store: Store, name: str, columns: list[str], read: list[str] | None = None, filter: Any = None) -> pd.DataFrame:
    df = store.read_table(name, missing_ok=True, columns=read, filter=filter).to_pandas()
    return df if len(df) else pd.DataFrame(columns=read or columns)
