"""Pull: annotations from Label Studio into the append-only `votes` table, exactly once.

One JSON export per project; every annotation whose id is already in `votes` or `quarantine` is skipped,
so a rerun adds zero rows and a pull interrupted anywhere is completed by the next one. Cancelled
(skipped) annotations are not votes. Worker ids are replaced by a keyed hash (HMAC-SHA256 with the
`crowd.pseudonym_key` secret) of the account's email before they reach any table. An annotation whose
result has an unexpected shape is quarantined with its id and the reason; it never stops the pull.

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

from crowd.client import CrowdClient
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
    seen: set[int],
    worker_of: dict[int, str],
    key: bytes,
    default_kind: str = "verify",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pure core of pull: (new vote rows, new quarantine rows) from a project export."""
    by_task: dict[int, dict[str, Any]] = {}
    by_image: dict[tuple[int, str], dict[str, Any]] = {}  # a grid task has one tasks row per image
    for r in tasks.to_dict("records") if len(tasks) else []:
        by_task.setdefault(int(r["task_id"]), r)
        by_image[(int(r["task_id"]), r["image_id"])] = r
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
            for image_id, answer in answers:
                r = rec if image_id is None else by_image[(task_id, image_id)]
                votes.append({"annotation_id": ann_id, "task_id": task_id, "image_id": r["image_id"],
                              "wnid": r["wnid"], "worker": worker, "answer": answer, "is_gold": bool(r["is_gold"]),
                              "lead_time_s": float(lead) if lead is not None else None,
                              "submitted_at": _ts(ann.get("created_at"))})
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


def _table(store: Store, name: str, columns: list[str]) -> pd.DataFrame:
    df = store.read_table(name, missing_ok=True).to_pandas()
    return df if len(df) else pd.DataFrame(columns=columns)


def pull(store: Store, client: CrowdClient, settings: Any, *, project_ids: list[int]) -> dict[str, Any]:
    """Pull every project in `project_ids`; append votes/quarantine; recompute `worker_gold`. Returns counts."""
    t0 = time.perf_counter()
    key = pseudonym_key(settings)
    votes = _table(store, "votes", VOTE_COLUMNS)
    quarantine = _table(store, "quarantine", QUARANTINE_COLUMNS)
    tasks = _table(store, "tasks", TASK_COLUMNS)
    seen = set(votes["annotation_id"].astype("int64")) | set(quarantine["annotation_id"].astype("int64"))
    worker_of = user_emails(client)
    new_votes, new_quar, n_exported = [], [], 0
    for pid in project_ids:
        export = client.export_json(pid)
        n_exported += sum(len(t.get("annotations") or []) for t in export)
        v, q = annotations_to_votes(export, project_id=pid, tasks=tasks[tasks["project_id"] == pid] if len(tasks) else tasks,
                                    seen=seen, worker_of=worker_of, key=key)
        new_votes.append(v)
        new_quar.append(q)
    v = pd.concat(new_votes, ignore_index=True) if new_votes else pd.DataFrame(columns=VOTE_COLUMNS)
    q = pd.concat(new_quar, ignore_index=True) if new_quar else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    if len(q):
        q = store.append_table("quarantine", q.drop_duplicates("annotation_id"), unique_by="annotation_id").to_pandas()
        quarantine = pd.concat([quarantine, q], ignore_index=True) if len(quarantine) else q
        log.warning("quarantined %d annotation(s): %s", len(q), q["reason"].value_counts().to_dict())
    if len(v):
        added = store.append_table("votes", v, unique_by=["annotation_id", "image_id"]).to_pandas()
        votes = pd.concat([votes, added], ignore_index=True) if len(votes) else added
    if len(v) or not store.has_table("worker_gold"):
        cs = settings.crowd
        wg = worker_gold(votes, tasks, min_n=cs.gold_min_n, min_accuracy=cs.gold_min_accuracy)
        store.write_table("worker_gold", wg)
    return {"new_votes": len(v), "quarantined": len(q), "annotations_seen": n_exported,
            "total_votes": len(votes), "seconds": round(time.perf_counter() - t0, 3)}
