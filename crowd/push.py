"""Push: turn the QC stage's plan (image_id, wnid, n_more) into Label Studio tasks, with gold controls.

Exactly-once without server transactions, in three steps:
1. `plan_requests` (pure) turns the plan into requests with a deterministic `request_id` = sha256(kind,
   project, image, wnid, k) where k counts the pair's earlier requests; a pair that still has an open
   request (its task not fully annotated, or never created) gets nothing new, so rerunning the same plan
   pushes nothing.
2. The requests are appended to the `push_requests` table (write-ahead) BEFORE any API call.
3. Tasks are imported in batches carrying `request_id` in their data; every batch is recorded in `tasks`.
   Each run starts with `reconcile`: tasks found on the server but missing from `tasks` (a crash after the
   import call) are recorded; requests with no server task (a crash before it) are imported again.

    >>> import pandas as pd
    >>> plan = pd.DataFrame({"image_id": ["a"], "wnid": ["n00000001"], "n_more": [3]})
    >>> reqs = plan_requests(plan, kind="verify", project_id=1, history=pd.DataFrame(columns=REQUEST_COLUMNS),
    ...                      open_request_ids=set(), gold=None, gold_rate=0.0)
    >>> reqs[["image_id", "overlap", "is_gold"]].values.tolist()
    [['a', 3, False]]
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from crowd.client import CrowdClient
from crowd.kinds import KINDS, REQUEST_COLUMNS, TASK_COLUMNS, TASK_KEY, TaskKind, request_id
from pipeline.errors import UserError
from pipeline.store import LocalStore, S3Store, Store

log = logging.getLogger("synsetforge.crowd")



class PlanError(UserError):
    """The push plan is unusable; the message names the rows and what to fix."""


def check_plan(plan: pd.DataFrame, default_overlap: int) -> pd.DataFrame:
    """Validate a push plan (image_id, wnid, n_more); returns it with n_more filled and rows with n_more 0 dropped."""
    missing = [c for c in ("image_id", "wnid") if c not in plan.columns]
    if missing:
        raise PlanError(f"push plan lacks column(s) {missing}; expected image_id, wnid, n_more (from `synsetforge qc`)")
    plan = plan.copy()
    if "n_more" not in plan.columns:
        plan["n_more"] = default_overlap
    plan["n_more"] = pd.to_numeric(plan["n_more"], errors="coerce")
    bad = plan[plan["image_id"].isna() | plan["wnid"].isna() | plan["n_more"].isna() | (plan["n_more"] < 0)]
    if len(bad):
        raise PlanError(
            f"push plan has {len(bad)} bad row(s) (null image_id/wnid or n_more not a count >= 0), "
            f"first: {bad.head(3).to_dict('records')}; fix the plan and rerun: nothing was pushed"
        )
    bad_wnid = plan[~plan["wnid"].astype(str).str.fullmatch(r"n\d{8}")]
    if len(bad_wnid):
        raise PlanError(f"push plan has wnid(s) not of the form n + 8 digits: {bad_wnid['wnid'].head(5).tolist()}")
    plan["n_more"] = plan["n_more"].astype(int)
    plan = plan[plan["n_more"] > 0]
    # One request per pair per push: a duplicated plan row would otherwise ask twice.
    return plan.groupby(["image_id", "wnid"], as_index=False, sort=False)["n_more"].max()


def plan_requests(
    plan: pd.DataFrame,
    *,
    kind: str,
    project_id: int,
    history: pd.DataFrame,
    open_request_ids: set[str],
    gold: pd.DataFrame | None,
    gold_rate: float,
    now: datetime | None = None,
) -> pd.DataFrame:
    """New requests for `plan` given earlier requests (`history`) and which of them are still open (pure)."""
    now = now or datetime.now(UTC)
    hist = history[(history["project_id"] == project_id) & (history["kind"] == kind)]
    seq = hist.groupby(["image_id", "wnid"]).size().to_dict()
    open_pairs = set(zip(hist.loc[hist["request_id"].isin(open_request_ids), "image_id"],
                         hist.loc[hist["request_id"].isin(open_request_ids), "wnid"], strict=True))
    rows: list[dict[str, Any]] = []
    gold_pairs = set() if gold is None else set(zip(gold["image_id"], gold["wnid"], strict=True))
    for rec in plan.itertuples(index=False):
        pair = (rec.image_id, rec.wnid)
        if pair in open_pairs or pair in gold_pairs:
            continue  # already being voted on; or a control, which only enters as gold
        k = seq.get(pair, 0)
        rows.append({"request_id": request_id(kind, project_id, rec.image_id, rec.wnid, k), "project_id": project_id,
                     "image_id": rec.image_id, "wnid": rec.wnid, "kind": kind, "is_gold": False, "gold_answer": None,
                     "overlap": int(rec.n_more), "requested_at": now, "task_key": None})
    if rows and gold is not None and len(gold) and gold_rate > 0:
        n_gold = max(1, round(len(rows) * gold_rate / (1.0 - gold_rate)))
        overlap = max(r["overlap"] for r in rows)  # every worker of the batch should meet the controls
        # Least-used controls first, ties in a fixed hashed order, so pushes are reproducible.
        g = gold.copy()
        g["used"] = [seq.get((i, w), 0) for i, w in zip(g["image_id"], g["wnid"], strict=True)]
        g["order"] = [hashlib.sha256(f"{i}|{w}".encode()).hexdigest() for i, w in zip(g["image_id"], g["wnid"], strict=True)]
        g = g[[(i, w) not in open_pairs for i, w in zip(g["image_id"], g["wnid"], strict=True)]]
        for rec in g.sort_values(["used", "order"]).head(n_gold).itertuples(index=False):
            k = seq.get((rec.image_id, rec.wnid), 0)
            rows.append({"request_id": request_id(kind, project_id, rec.image_id, rec.wnid, k),
                         "project_id": project_id, "image_id": rec.image_id, "wnid": rec.wnid, "kind": kind,
                         "is_gold": True, "gold_answer": str(rec.answer), "overlap": overlap, "requested_at": now,
                         "task_key": None})
        # Shuffle controls among real tasks deterministically, so they are not all at the end of the queue.
        rows.sort(key=lambda r: r["request_id"])
    return pd.DataFrame(rows, columns=REQUEST_COLUMNS)


def usable_gold(gold: pd.DataFrame, synsets: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The controls a task can be built for (their synset and stored image known), answers yes/no only; a control
    the store no longer holds is left out, with a log line, instead of failing the push.

        >>> g = pd.DataFrame({"image_id": ["a", "b", "c"], "wnid": ["n00000001"] * 3, "answer": ["yes", "No", "no"]})
        >>> syn = pd.DataFrame({"wnid": ["n00000001"]})
        >>> imgs = pd.DataFrame({"image_id": ["a", "b"], "storage_key": ["k1", "k2"]})
        >>> usable_gold(g, syn, imgs)[["image_id", "answer"]].values.tolist()
        [['a', 'yes'], ['b', 'no']]
    """
    answer = gold["answer"].astype(str).str.strip().str.lower()
    stored = set(images.loc[images["image_id"].notna() & images["storage_key"].notna(), "image_id"])
    ok = gold["wnid"].isin(set(synsets["wnid"])) & gold["image_id"].isin(stored) & answer.isin(["yes", "no"])
    if not ok.all():
        log.warning("%d gold control(s) name an image or synset the store does not hold (or an answer other than "
                    "yes/no) and are not pushed; `synsetforge crowd gold --refresh` rebuilds the gold table",
                    int((~ok).sum()))
    return gold[ok].assign(answer=answer[ok]).reset_index(drop=True)


def read_push_plan(store: Store) -> pd.DataFrame:
    """The QC stage's `push_plan` table (validated by its schema file once the QC stage ships it)."""
    if not store.has_table("push_plan"):
        raise PlanError(f"no push_plan table in {store.url}; run `synsetforge qc` first or pass a plan")
    from pipeline.schemas import SCHEMA_DIR

    if (SCHEMA_DIR / "push_plan.json").exists():
        return store.read_table("push_plan").to_pandas()
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get("tables/push_plan.parquet"))).to_pandas()


# -- image URLs -------------------------------------------------------------------------------------------
def image_url_resolver(store: Store, images: pd.DataFrame, *, files_root: str | None, expiry_s: int) -> Callable[[str], str]:
    """image_id -> URL the annotator's browser can load.

    Local store: Label Studio's own local-files endpoint (same origin as the labeling UI, so no CORS issue);
    S3: a presigned GET URL with an expiry (the bucket needs a CORS rule for the Label Studio origin).
    """
    keys = dict(zip(images["image_id"], images["storage_key"], strict=True))

    def resolve(image_id: str) -> str:
        key = keys.get(image_id)
        if key is None:
            raise KeyError(image_id)
        if isinstance(store, S3Store):
            return store.presigned_url(key, expiry_s)
        if isinstance(store, LocalStore):
            root = Path(files_root).resolve() if files_root else store.root
            path = store.path(key)
            try:
                rel = path.relative_to(root)
            except ValueError:
                raise PlanError(
                    f"image {image_id} is stored at {path}, outside the Label Studio files root {root}; "
                    "start Label Studio with LOCAL_FILES_DOCUMENT_ROOT at or above the store (crowd.files_root)"
                ) from None
            return f"/data/local-files/?d={quote(str(rel))}"
        raise PlanError(f"store {store.url}: no way to give annotators image URLs for this backend")

    return resolve


def accepted_examples(store: Store, resolve: Callable[[str], str], per_wnid: int = 3) -> dict[str, list[str]]:
    """Up to `per_wnid` already-accepted images per synset (from QC's labels), shown as examples."""
    if not store.has_table("labels"):
        return {}
    labels = store.read_table("labels").to_pandas()
    acc = labels[labels["status"] == "accepted"].sort_values(["wnid", "image_id"]).groupby("wnid").head(per_wnid)
    out: dict[str, list[str]] = {}
    for rec in acc.itertuples(index=False):
        try:
            out.setdefault(rec.wnid, []).append(resolve(rec.image_id))
        except (KeyError, PlanError):
            continue  # an accepted image no longer in the images table is simply not shown
    return out


# -- the I/O shell ----------------------------------------------------------------------------------------
def _read(store: Store, name: str, columns: list[str]) -> pd.DataFrame:
    df = store.read_table(name, missing_ok=True).to_pandas()
    return df if len(df) else pd.DataFrame(columns=columns)


def _append(store: Store, name: str, old: pd.DataFrame, new: pd.DataFrame, key: str | list[str]) -> pd.DataFrame:
    """Append the rows of `new` whose key is neither in `old` (what this run read) nor in the table (what
    another writer committed since): one commit of the new rows only. Returns old + the rows appended."""
    keys = [key] if isinstance(key, str) else list(key)
    fresh = new.drop_duplicates(subset=keys, keep="first")
    if len(old) and len(fresh):
        fresh = fresh[~pd.MultiIndex.from_frame(fresh[keys]).isin(pd.MultiIndex.from_frame(old[keys]))]
    if not len(fresh):
        if not store.has_table(name):
            store.write_table(name, fresh)  # the table exists after a push, even an empty one
        return old
    added = store.append_table(name, fresh, unique_by=keys).to_pandas()
    return pd.concat([old, added], ignore_index=True) if len(old) else added


def server_tasks(client: CrowdClient, project_id: int, *, expand_items: bool = False) -> pd.DataFrame:
    """request_id, task_id, is_labeled, total_annotations of every task of a project (one paged listing).
    expand_items: a multi-image (grid) task gives one row per image, with that image's request id."""
    rows = []
    for t in client.iter_tasks(project_id, fields="all"):
        data = t.get("data") or {}
        row = {"request_id": data.get("request_id"), "task_id": int(t["id"]),
               "is_labeled": bool(t.get("is_labeled")), "total_annotations": int(t.get("total_annotations") or 0),
               "cancelled_annotations": int(t.get("cancelled_annotations") or 0),
               "image_id": data.get("image_id"), "wnid": data.get("wnid")}
        kind = KINDS.get(data.get("kind") or "")
        if expand_items and kind is not None and kind.items is not None:
            try:
                rows += [{**row, "request_id": rid or None, "image_id": iid} for rid, iid in kind.items(data)]
            except ValueError:
                rows.append(row)  # malformed data: reported as an unknown server task
            continue
        rows.append(row)
    return pd.DataFrame(rows, columns=["request_id", "task_id", "is_labeled", "total_annotations",
                                       "cancelled_annotations", "image_id", "wnid"])


def reconcile(store: Store, client: CrowdClient, project_id: int) -> dict[str, Any]:
    """Record server tasks the `tasks` table misses; report requests with no task and unknown server tasks."""
    requests = _read(store, "push_requests", REQUEST_COLUMNS)
    tasks = _read(store, "tasks", TASK_COLUMNS)
    remote = server_tasks(client, project_id, expand_items=True)
    dup = remote[remote["request_id"].notna() & remote["request_id"].duplicated(keep=False)]
    if len(dup):
        log.error("project %s has %d tasks sharing a request_id: %s", project_id, len(dup), dup.head().to_dict("records"))
    known = set(tasks["task_id"].astype("int64")) if len(tasks) else set()
    reqs = requests.set_index("request_id") if len(requests) else None
    adopt = []
    for r in remote.itertuples(index=False):
        if r.task_id in known or r.request_id is None or reqs is None or r.request_id not in reqs.index:
            continue
        q = reqs.loc[r.request_id]
        adopt.append({"task_id": r.task_id, "project_id": project_id, "request_id": r.request_id,
                      "image_id": q["image_id"], "wnid": q["wnid"], "kind": q["kind"], "is_gold": bool(q["is_gold"]),
                      "gold_answer": q["gold_answer"], "pushed_at": datetime.now(UTC)})
    if adopt:
        tasks = _append(store, "tasks", tasks, pd.DataFrame(adopt, columns=TASK_COLUMNS), TASK_KEY)
        log.info("reconciled %d task(s) pushed before a crash", len(adopt))
    on_server = set(remote["request_id"].dropna())
    mine = requests[requests["project_id"] == project_id] if len(requests) else requests
    pending = mine[~mine["request_id"].isin(on_server)] if len(mine) else mine
    unknown = remote[~remote["request_id"].isin(set(requests["request_id"]) if len(requests) else set())]
    return {"adopted": len(adopt), "pending": pending, "remote": remote, "tasks": tasks, "requests": requests,
            "unknown_server_tasks": len(unknown)}


def push(
    store: Store,
    client: CrowdClient,
    settings: Any,
    *,
    project_id: int,
    kind: str = "verify",
    plan: pd.DataFrame | None = None,
    gold: pd.DataFrame | None = None,
    synsets: pd.DataFrame | None = None,
    images: pd.DataFrame | None = None,
    examples: dict[str, list[str]] | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Push the plan (default: the `push_plan` table) to a provisioned project; returns counts."""
    t0 = time.perf_counter()
    cs = settings.crowd
    task_kind: TaskKind = KINDS[kind]
    if plan is None:
        plan = read_push_plan(store)
    plan = check_plan(plan, cs.default_overlap)
    if gold is None and store.has_table("gold"):
        gold = store.read_table("gold").to_pandas()
    if gold is not None and len(gold):
        synsets = synsets if synsets is not None else store.read_table("synsets").to_pandas()
        images = images if images is not None else store.read_table("images").to_pandas()
        gold = usable_gold(gold, synsets, images)
    state = reconcile(store, client, project_id)
    remote, tasks, history = state["remote"], state["tasks"], state["requests"]
    open_ids = set(state["pending"]["request_id"]) | set(remote.loc[~remote["is_labeled"].astype(bool), "request_id"].dropna())
    new = plan_requests(plan, kind=kind, project_id=project_id, history=history, open_request_ids=open_ids,
                        gold=gold, gold_rate=0.0 if task_kind.group else cs.gold_rate)
    if task_kind.group is not None:  # multi-image kinds: requests -> tasks of many images, controls per task
        new = task_kind.group(new, gold=gold, history=history, project_id=project_id,
                              size=getattr(cs, "grid_size", 48), positives=getattr(cs, "grid_positives", 3),
                              negatives=getattr(cs, "grid_negatives", 3), kind=kind)
    if len(new):  # write-ahead: the request exists before the task does
        history = _append(store, "push_requests", history, new, "request_id")
    todo = pd.concat([state["pending"], new], ignore_index=True) if len(state["pending"]) else new
    if todo.empty:
        return {"project_id": project_id, "pushed": 0, "gold": 0, "adopted": state["adopted"], "seconds": 0.0}

    # Task data for every request; a request naming an unknown synset or image fails before any API call.
    synsets = synsets if synsets is not None else store.read_table("synsets").to_pandas()
    images = images if images is not None else store.read_table("images").to_pandas()
    images = images[images["image_id"].notna() & images["storage_key"].notna()]
    resolve = image_url_resolver(store, images, files_root=cs.files_root, expiry_s=cs.image_url_expiry_s)
    if examples is None:
        examples = accepted_examples(store, resolve)
    ctx = {"synsets": {r["wnid"]: r for r in synsets.to_dict("records")}, "examples": examples, "image_url": resolve}
    payload, problems = [], []
    for req, items in _task_requests(todo, task_kind):
        try:
            data = task_kind.build(req, ctx)
        except KeyError as exc:
            problems.append(f"{req.get('image_id', req['request_id'])}/{req['wnid']}: unknown {exc.args[0]!r}")
            continue
        data.update({"request_id": req["request_id"], "wnid": req["wnid"], "kind": kind})
        if task_kind.items is None:
            data["image_id"] = req["image_id"]
        payload.append({"data": data, "overlap": int(req["overlap"]), "_req": req, "_items": items})
    if problems:
        raise PlanError(
            f"{len(problems)} push request(s) name an image or synset the store does not have (first: {problems[:3]}); "
            "run ingest/vocabulary for them or drop them from the plan; nothing was pushed"
        )
    _ensure_overlap(client, project_id, int(todo["overlap"].max()))
    size = batch_size or cs.batch_size
    if task_kind.items is not None:  # batch_size counts images: a grid task holds many
        size = max(1, size // max(1, max(len(b["_items"]) for b in payload)))
    pushed = n_images = 0
    for start in range(0, len(payload), size):
        batch = payload[start:start + size]
        ids = _import_batch(client, project_id, batch)
        now = datetime.now(UTC)
        rows = [{"task_id": tid, "project_id": project_id, "request_id": it["request_id"],
                 "image_id": it["image_id"], "wnid": it["wnid"], "kind": kind,
                 "is_gold": bool(it["is_gold"]), "gold_answer": it["gold_answer"], "pushed_at": now}
                for b, tid in zip(batch, ids, strict=True) if tid is not None for it in b["_items"]]
        tasks = _append(store, "tasks", tasks, pd.DataFrame(rows, columns=TASK_COLUMNS), TASK_KEY)
        pushed += sum(tid is not None for tid in ids)
        n_images += len(rows)
    n_gold = int(sum(bool(it["is_gold"]) for b in payload for it in b["_items"]))
    return {"project_id": project_id, "pushed": pushed, "images": n_images, "gold": n_gold, "adopted": state["adopted"],
            "resumed": len(state["pending"]), "seconds": round(time.perf_counter() - t0, 3)}


def _task_requests(todo: pd.DataFrame, task_kind: TaskKind) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(task request, its per-image requests): one each for one-image kinds; a multi-image kind's requests are
    gathered by `task_key` (set by its `group`), so a resumed push rebuilds exactly the grids it logged."""
    recs = todo.to_dict("records")
    if task_kind.items is None:
        return [(r, [r]) for r in recs]
    grids: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        if not isinstance(r.get("task_key"), str):
            raise PlanError(f"push request {r['request_id']} of kind {task_kind.name} has no task_key; "
                            "it was logged by an older push: delete it from push_requests and push again")
        grids.setdefault(r["task_key"], []).append(r)
    return [({"request_id": key, "wnid": items[0]["wnid"], "overlap": max(int(i["overlap"]) for i in items),
              "is_gold": False, "gold_answer": None, "items": items}, items) for key, items in grids.items()]


def _ensure_overlap(client: CrowdClient, project_id: int, overlap: int) -> None:
    """Label Studio's open-source import ignores a per-task overlap, so the plan's largest n_more becomes the
    project's `maximum_annotations` (annotations per task)."""
    proj = client.get_json(f"/api/projects/{project_id}/")
    if int(proj.get("maximum_annotations") or 1) != overlap:
        client.call(f"set overlap of project {project_id}", client.sdk.projects.update, id=project_id,
                    maximum_annotations=overlap)


def _import_batch(client: CrowdClient, project_id: int, batch: list[dict[str, Any]]) -> list[int | None]:
    """Import one batch once (`CrowdClient.import_tasks` looks before it retries); task ids in batch order."""
    body = [{"data": b["data"], "overlap": b["overlap"]} for b in batch]

    def existing() -> dict[str, int]:
        remote = server_tasks(client, project_id)
        remote = remote[remote["request_id"].notna()]
        return dict(zip(remote["request_id"], remote["task_id"], strict=True))

    return client.import_tasks(project_id, body, existing)
