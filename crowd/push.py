"""Push: turn the QC stage's plan (image_id, wnid, n_more) into Label Studio tasks, with gold controls.

Exactly-once without server transactions, in three steps:
1. `plan_requests` (pure) turns the plan into requests with a deterministic `request_id` = sha256(kind, image,
   wnid, k) where k counts the pair's earlier requests of the kind; a pair that still has an open request (its task
   has fewer annotations pulled than it asked for, or was never created) gets nothing new, so rerunning the same
   plan pushes nothing, and a pair never has two open tasks.
2. Each request goes to a project of its overlap (n_more annotations per task) with room (`crowd.project_size`
   tasks per project; `crowd.provision.open_project`); the requests are appended to the `push_requests` table
   (write-ahead) BEFORE any API call.
3. Tasks are imported in batches carrying `request_id` in their data; every batch is recorded in `tasks`.
   Each run starts with `reconcile`, which looks only at the batch in doubt: requests with no `tasks` row. Label
   Studio lists just the tasks created after the newest one recorded in their project; those carrying an in-doubt
   request id (a crash after the import call) are recorded, the rest (a crash before it) are imported again.
   No step lists every task of a project.

A project's overlap (Label Studio's `maximum_annotations`) is set when it is created and never changed: Label
Studio 1.23.2's import gives each task its project's overlap and ignores a per-task one, and a changed project
overlap is applied to every task the project holds.

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

from crowd.client import CrowdClient, task_filter
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
    overlap: int | None = None,
) -> pd.DataFrame:
    """New requests for `plan` given earlier requests (`history`) and which of them are still open (pure).

    A pair with an open request of this kind, in any project, gets nothing new; k (the pair's sequence number in its
    request id) counts its requests of this kind in every project. Each request asks for its plan row's n_more
    annotations (`overlap`: that many for every request); controls are mixed into each overlap's requests at
    `gold_rate`, with that overlap, least-used first."""
    now = now or datetime.now(UTC)
    hist = history[history["kind"] == kind] if len(history) else history
    seq = hist.groupby(["image_id", "wnid"]).size().to_dict() if len(hist) else {}
    is_open = hist["request_id"].isin(open_request_ids) if len(hist) else pd.Series(dtype=bool)
    open_pairs = set(zip(hist.loc[is_open, "image_id"], hist.loc[is_open, "wnid"], strict=True)) if len(hist) else set()
    rows: list[dict[str, Any]] = []
    gold_pairs = set() if gold is None else set(zip(gold["image_id"], gold["wnid"], strict=True))
    for rec in plan.itertuples(index=False):
        pair = (rec.image_id, rec.wnid)
        if pair in open_pairs or pair in gold_pairs:
            continue  # already being voted on; or a control, which only enters as gold
        k = seq.get(pair, 0)
        rows.append({"request_id": request_id(kind, project_id, rec.image_id, rec.wnid, k), "project_id": project_id,
                     "image_id": rec.image_id, "wnid": rec.wnid, "kind": kind, "is_gold": False, "gold_answer": None,
                     "overlap": int(overlap or rec.n_more), "requested_at": now, "task_key": None})
    if rows and gold is not None and len(gold) and gold_rate > 0:
        # Least-used controls first, ties in a fixed hashed order, so pushes are reproducible.
        g = gold.copy()
        g["used"] = [seq.get((i, w), 0) for i, w in zip(g["image_id"], g["wnid"], strict=True)]
        g["order"] = [hashlib.sha256(f"{i}|{w}".encode()).hexdigest() for i, w in zip(g["image_id"], g["wnid"], strict=True)]
        g = g[[(i, w) not in open_pairs for i, w in zip(g["image_id"], g["wnid"], strict=True)]]
        pool = list(g.sort_values(["used", "order"]).itertuples(index=False))
        by_overlap: dict[int, int] = {}
        for r in rows:
            by_overlap[r["overlap"]] = by_overlap.get(r["overlap"], 0) + 1
        for ov, n in sorted(by_overlap.items(), reverse=True):  # each project's workers meet controls
            n_gold = max(1, round(n * gold_rate / (1.0 - gold_rate)))
            picked, pool = pool[:n_gold], pool[n_gold:]
            for rec in picked:
                k = seq.get((rec.image_id, rec.wnid), 0)
                rows.append({"request_id": request_id(kind, project_id, rec.image_id, rec.wnid, k),
                             "project_id": project_id, "image_id": rec.image_id, "wnid": rec.wnid, "kind": kind,
                             "is_gold": True, "gold_answer": str(rec.answer), "overlap": ov, "requested_at": now,
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
def _read(store: Store, name: str, columns: list[str], filter: Any = None) -> pd.DataFrame:
    df = store.read_table(name, missing_ok=True, filter=filter).to_pandas()
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


SERVER_TASK_COLUMNS = ["request_id", "task_id", "is_labeled", "total_annotations", "cancelled_annotations",
                       "image_id", "wnid"]


def task_rows(tasks: Any, *, expand_items: bool = False) -> pd.DataFrame:
    """request_id, task_id, is_labeled, annotation counts, image_id, wnid of server tasks (dicts). expand_items: a
    multi-image (grid) task gives one row per image, with that image's request id."""
    rows = []
    for t in tasks:
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
    return pd.DataFrame(rows, columns=SERVER_TASK_COLUMNS)


def server_tasks(client: CrowdClient, project_id: int, *, expand_items: bool = False,
                 after_id: int | None = None) -> pd.DataFrame:
    """The tasks of a project (`task_rows`): every one (one paged listing of the whole project: for status checks
    and tests, never on the push path), or with `after_id` only those created after that task (a Data Manager
    filter on the id, which Label Studio answers from its index)."""
    if after_id is None:
        return task_rows(client.iter_tasks(project_id, fields="all"), expand_items=expand_items)
    found = client.iter_filtered_tasks(project_id, [task_filter("id", "greater", int(after_id), "Number")])
    return task_rows(found, expand_items=expand_items)


def task_progress(store: Store, tasks: pd.DataFrame) -> pd.Series:
    """task_id -> annotations pulled for it (distinct annotation ids in `votes` and `quarantine`), for the given
    `tasks` rows; reads only the votes of task ids from the smallest one on (task ids grow, and so do the votes'
    data files, so older files are skipped by their statistics)."""
    if tasks.empty:
        return pd.Series(dtype="int64")
    ids = pd.Index(tasks["task_id"].astype("int64").unique())
    low = [("task_id", ">=", int(ids.min()))]
    parts = []
    for name in ("votes", "quarantine"):
        if store.has_table(name):
            t = store.read_table(name, columns=["annotation_id", "task_id"], filter=low).to_pandas()
            parts.append(t[t["task_id"].isin(ids)])
    if not parts:
        return pd.Series(0, index=ids, dtype="int64")
    anns = pd.concat(parts, ignore_index=True).drop_duplicates()
    return anns.groupby("task_id")["annotation_id"].nunique().reindex(ids, fill_value=0).astype("int64")


def open_requests(requests: pd.DataFrame, tasks: pd.DataFrame, progress: pd.Series) -> set[str]:
    """Request ids still open (pure): no task recorded yet (in doubt, or to be imported), or a task with fewer
    annotations pulled than the overlap it asked for. A pair with an open request gets no new task.

        >>> reqs = pd.DataFrame({"request_id": ["a", "b", "c"], "overlap": [2, 2, 1]})
        >>> tasks = pd.DataFrame({"request_id": ["a", "b"], "task_id": [10, 11]})
        >>> sorted(open_requests(reqs, tasks, pd.Series({10: 2, 11: 1})))
        ['b', 'c']
    """
    if requests.empty:
        return set()
    task_of = dict(zip(tasks["request_id"], tasks["task_id"].astype("int64"), strict=True)) if len(tasks) else {}
    out = set()
    for rid, ov in zip(requests["request_id"], requests["overlap"], strict=True):
        tid = task_of.get(rid)
        if tid is None or int(progress.get(tid, 0)) < int(ov):
            out.add(rid)
    return out


def reconcile(store: Store, client: CrowdClient, requests: pd.DataFrame, tasks: pd.DataFrame) -> dict[str, Any]:
    """Adopt the batch in doubt: the write-ahead `requests` rows with no `tasks` row (a crash between an import and
    its table write, or before the import). For each project holding such requests, Label Studio lists only the
    tasks created after the newest task the table knows there; those carrying an in-doubt request id are recorded,
    the other in-doubt requests are imported again by the caller. `tasks`: the tasks rows of the same projects."""
    known = set(tasks["request_id"]) if len(tasks) else set()
    doubt = requests[~requests["request_id"].isin(known)] if len(requests) else requests
    adopt, unknown = [], 0
    for pid, mine in (doubt.groupby("project_id") if len(doubt) else []):
        pid = int(pid)
        here = tasks[tasks["project_id"] == pid] if len(tasks) else tasks
        after = int(here["task_id"].max()) if len(here) else 0
        remote = server_tasks(client, pid, expand_items=True, after_id=after)
        reqs = mine.set_index("request_id")
        for r in remote.itertuples(index=False):
            if r.request_id is None or r.request_id not in reqs.index:
                unknown += r.request_id not in known
                continue
            q = reqs.loc[r.request_id]
            adopt.append({"task_id": r.task_id, "project_id": pid, "request_id": r.request_id,
                          "image_id": q["image_id"], "wnid": q["wnid"], "kind": q["kind"], "is_gold": bool(q["is_gold"]),
                          "gold_answer": q["gold_answer"], "pushed_at": datetime.now(UTC)})
    if adopt:
        tasks = _append(store, "tasks", tasks, pd.DataFrame(adopt, columns=TASK_COLUMNS), TASK_KEY)
        log.info("reconciled %d task(s) pushed before a crash", len(adopt))
    adopted = {a["request_id"] for a in adopt}
    pending = doubt[~doubt["request_id"].isin(adopted)] if len(doubt) else doubt
    if unknown:
        log.warning("%d task(s) created after synsetforge's last one carry no request id it logged (imported by hand?); "
                    "they are left alone", unknown)
    return {"adopted": len(adopt), "pending": pending.reset_index(drop=True), "tasks": tasks,
            "unknown_server_tasks": unknown}


def _register(client: CrowdClient, settings: Any, table: pd.DataFrame, project_id: int, kind: str) -> pd.DataFrame:
    """Add a project given by id that the projects table does not know (titled by hand) to the table."""
    from crowd.provision import OPEN, add_projects, parse_title

    if int(project_id) in set(table["project_id"].astype("int64")):
        return table
    proj = client.get_json(f"/api/projects/{int(project_id)}/")
    parsed = parse_title(settings.crowd.project_prefix, proj.get("title") or "")
    row = {"project_id": int(project_id), "kind": kind, "overlap": int(proj.get("maximum_annotations") or 1),
           "shard": parsed[1] if parsed else 0, "title": proj.get("title") or "", "n_tasks": int(proj.get("task_number") or 0),
           "state": OPEN, "watermark": pd.NaT, "pulled_at": pd.NaT, "updated_at": pd.Timestamp.now(tz="UTC").floor("us")}
    return add_projects(table, [row])


def push(
    store: Store,
    client: CrowdClient,
    settings: Any,
    *,
    project_id: int | None = None,
    kind: str = "verify",
    plan: pd.DataFrame | None = None,
    gold: pd.DataFrame | None = None,
    synsets: pd.DataFrame | None = None,
    images: pd.DataFrame | None = None,
    examples: dict[str, list[str]] | None = None,
    batch_size: int | None = None,
    overlap: int | None = None,
) -> dict[str, Any]:
    """Push the plan (default: the `push_plan` table) as tasks; returns counts and a `message` saying what was done.

    Each request asks for its plan row's n_more annotations (`overlap`: that many for all) and goes to an open
    project of the kind with that overlap (`project_id` first, when it is one), opened when none has room
    (`crowd.provision.open_project`). A project's overlap is never changed. A pair with an open task of this kind in
    any project gets no second one (see `open_requests`); they are counted in `open_pairs`."""
    from crowd.provision import FULL, active_projects, image_dir_of, open_project, sync_projects, write_projects

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

    table = sync_projects(client, store, settings)
    if project_id is not None:
        table = _register(client, settings, table, int(project_id), kind)
    history = _read(store, "push_requests", REQUEST_COLUMNS)
    recorded = set(table["project_id"].astype("int64"))
    live = set(active_projects(table, [kind])["project_id"].astype("int64"))
    mine = history[history["kind"] == kind] if len(history) else history
    if len(mine):  # requests of projects the table does not know (e.g. made before it) are taken as live
        live |= set(mine["project_id"].astype("int64")) - recorded
    live_reqs = mine[mine["project_id"].isin(live)] if len(mine) else mine
    tasks = _read(store, "tasks", TASK_COLUMNS, filter=[("project_id", "in", sorted(live))]) if live else \
        pd.DataFrame(columns=TASK_COLUMNS)
    state = reconcile(store, client, live_reqs, tasks)
    tasks = state["tasks"]
    open_ids = open_requests(live_reqs, tasks, task_progress(store, tasks))
    pairs_open = set(zip(mine.loc[mine["request_id"].isin(open_ids), "image_id"],
                         mine.loc[mine["request_id"].isin(open_ids), "wnid"], strict=True)) if len(mine) else set()
    n_open = sum((i, w) in pairs_open for i, w in zip(plan["image_id"], plan["wnid"], strict=True))
    # Request ids name the kind, the pair and k (its requests of the kind in every project); the project is chosen
    # after, by overlap and room, so the ids are computed with project 0 (which Label Studio never uses).
    hist0 = mine.assign(project_id=0) if len(mine) else mine
    new = plan_requests(plan, kind=kind, project_id=0, history=hist0, open_request_ids=open_ids, gold=gold,
                        gold_rate=0.0 if task_kind.group else cs.gold_rate, overlap=overlap)
    if task_kind.group is not None and len(new):  # multi-image kinds: grids of one overlap each
        new = pd.concat([task_kind.group(grp, gold=gold, history=hist0, project_id=0,
                                         size=getattr(cs, "grid_size", 48), positives=getattr(cs, "grid_positives", 3),
                                         negatives=getattr(cs, "grid_negatives", 3), kind=kind)
                         for _, grp in new.groupby("overlap", sort=True)], ignore_index=True)
    new, table = _assign_projects(client, store, settings, table, new, kind, prefer=project_id,
                                  image_dir=image_dir_of(store), open_project=open_project)
    if len(new):  # write-ahead: the request exists before the task does
        history = _append(store, "push_requests", history, new, "request_id")
    todo = pd.concat([state["pending"], new], ignore_index=True) if len(state["pending"]) else new
    summary = {"project_id": int(project_id) if project_id is not None else None, "pushed": 0, "images": 0, "gold": 0,
               "adopted": state["adopted"], "resumed": len(state["pending"]), "open_pairs": n_open, "projects": {},
               "seconds": 0.0}
    if todo.empty:
        write_projects(store, table)
        summary["message"] = _message(summary, table)
        return summary

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
        payload.append({"data": data, "overlap": int(req["overlap"]), "project_id": int(items[0]["project_id"]),
                        "_req": req, "_items": items})
    if problems:
        raise PlanError(
            f"{len(problems)} push request(s) name an image or synset the store does not have (first: {problems[:3]}); "
            "run ingest/vocabulary for them or drop them from the plan; nothing was pushed"
        )
    size = batch_size or cs.batch_size
    if task_kind.items is not None:  # batch_size counts images: a grid task holds many
        size = max(1, size // max(1, max(len(b["_items"]) for b in payload)))
    per_project: dict[int, list[dict[str, Any]]] = {}
    for b in payload:
        per_project.setdefault(b["project_id"], []).append(b)
    for pid, items in per_project.items():
        here = tasks[tasks["project_id"] == pid] if len(tasks) else tasks
        floor = int(here["task_id"].max()) if len(here) else 0
        for start in range(0, len(items), size):
            batch = items[start:start + size]
            ids = _import_batch(client, pid, batch, after_id=floor)
            now = datetime.now(UTC)
            rows = [{"task_id": tid, "project_id": pid, "request_id": it["request_id"],
                     "image_id": it["image_id"], "wnid": it["wnid"], "kind": kind,
                     "is_gold": bool(it["is_gold"]), "gold_answer": it["gold_answer"], "pushed_at": now}
                    for b, tid in zip(batch, ids, strict=True) if tid is not None for it in b["_items"]]
            tasks = _append(store, "tasks", tasks, pd.DataFrame(rows, columns=TASK_COLUMNS), TASK_KEY)
            done = [tid for tid in ids if tid is not None]
            floor = max([floor, *done])
            summary["pushed"] += len(done)
            summary["images"] += len(rows)
            summary["projects"][pid] = summary["projects"].get(pid, 0) + len(done)
    summary["gold"] = int(sum(bool(it["is_gold"]) for b in payload for it in b["_items"]))
    table = sync_projects(client, store, settings, table)  # task counts as the server has them now
    write_projects(store, table)
    full = table[table["project_id"].isin(list(summary["projects"])) & (table["state"] == FULL)]
    if len(full):
        log.info("project(s) %s are full (%d tasks): the next push opens a new one", full["project_id"].tolist(),
                 cs.project_size)
    summary["project_id"] = summary["project_id"] or next(iter(summary["projects"]), None)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["message"] = _message(summary, table)
    return summary


def _assign_projects(client: CrowdClient, store: Store, settings: Any, table: pd.DataFrame, new: pd.DataFrame,
                     kind: str, *, prefer: int | None, image_dir: Any, open_project: Callable[..., Any]
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give each new request its project: the tasks of one overlap fill an open project of that overlap up to
    crowd.project_size, then the next (opened as needed). A multi-image task's requests (one task_key) stay
    together. Returns the requests with project_id set, and the table with the planned task counts."""
    if new.empty:
        return new, table
    size = settings.crowd.project_size
    new = new.copy()
    unit = new["task_key"].where(new["task_key"].notna(), new["request_id"])
    target: dict[str, int] = {}
    table = table.copy()
    for ov, grp in new.groupby("overlap", sort=True):
        units = list(dict.fromkeys(unit[grp.index]))
        while units:
            pid, table = open_project(client, store, settings, table, kind, int(ov), image_dir=image_dir,
                                      prefer=prefer)
            i = table.index[table["project_id"] == pid][0]
            room = max(1, size - int(table.loc[i, "n_tasks"]))
            take, units = units[:room], units[room:]
            target.update(dict.fromkeys(take, pid))
            table.loc[i, "n_tasks"] = int(table.loc[i, "n_tasks"]) + len(take)  # planned: the next loop sees it
    new["project_id"] = [target[u] for u in unit]
    return new, table


def _message(summary: dict[str, Any], table: pd.DataFrame) -> str:
    """What a push did, in words (the CLI prints it; a DAG task returns it)."""
    titles = dict(zip(table["project_id"].astype("int64"), table["title"], strict=True)) if len(table) else {}
    overlaps = dict(zip(table["project_id"].astype("int64"), table["overlap"], strict=True)) if len(table) else {}
    parts = [f"pushed {summary['pushed']} task(s) ({summary['gold']} gold)"]
    if summary["projects"]:
        parts[0] += " to " + ", ".join(
            f"project {p} ({titles.get(p, '?')}, {int(overlaps.get(p, 0))} annotation(s) per task): {n}"
            for p, n in summary["projects"].items())
    if summary["adopted"]:
        parts.append(f"recorded {summary['adopted']} task(s) an earlier run had created")
    if summary["resumed"]:
        parts.append(f"imported {summary['resumed']} request(s) an earlier run had logged")
    if summary["open_pairs"]:
        parts.append(f"{summary['open_pairs']} pair(s) of the plan already have an open task (no second task: they "
                     "are asked again once their task has all its annotations)")
    return "; ".join(parts)


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


def _import_batch(client: CrowdClient, project_id: int, batch: list[dict[str, Any]], *, after_id: int = 0
                  ) -> list[int | None]:
    """Import one batch once (`CrowdClient.import_tasks` looks before it retries); task ids in batch order. What the
    server holds after a lost answer is asked for only among the tasks created after `after_id` (the newest task
    recorded in this project before the batch), not by listing the project."""
    body = [{"data": b["data"]} for b in batch]  # the project's overlap applies (Label Studio ignores a task's own)

    def existing() -> dict[str, int]:
        remote = server_tasks(client, project_id, after_id=after_id)
        remote = remote[remote["request_id"].notna()]
        return dict(zip(remote["request_id"], remote["task_id"], strict=True))

    return client.import_tasks(project_id, body, existing)
