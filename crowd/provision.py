"""Idempotent provisioning: projects found by title (created with the config file and an overlap that never changes
afterwards), local-files storage for images, and the `projects` table of sharded projects.

A kind's tasks live in several Label Studio projects: each holds at most `crowd.project_size` tasks and has one
overlap (annotations per task, Label Studio's `maximum_annotations`), fixed when the project is created: Label
Studio's open-source import gives every task the project's overlap and ignores a per-task one, and raising the
project's overlap later changes the overlap of every task it already holds. So a request for k annotations goes to
an open project of overlap k, and a full project is followed by a new one. Titles are numbered per kind: the
first project is '<prefix> <kind>', the n-th '<prefix> <kind> <n>', so a crash between creating a project and
recording it is repaired by finding it again by its title (`sync_projects`).

    >>> project_title("synsetforge", "verify"), project_title("synsetforge", "verify", 3)
    ('synsetforge verify', 'synsetforge verify 3')
    >>> parse_title("synsetforge", "synsetforge grid 12"), parse_title("synsetforge", "other verify")
    (('grid', 12), None)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from crowd.client import CrowdClient, CrowdError
from crowd.kinds import KINDS

log = logging.getLogger("synsetforge.crowd")

PROJECT_DEFAULTS = {
    # Annotators get the task with the fewest annotations first, so overlap fills evenly.
    "sampling": "Uniform sampling",
    "show_overlap_first": True,
    "show_skip_button": True,
    "show_instruction": False,
    "enable_empty_annotation": False,
    "overlap_cohort_percentage": 100,
}
PROJECT_COLUMNS = ["project_id", "kind", "overlap", "shard", "title", "n_tasks", "state", "watermark", "pulled_at",
                   "updated_at"]
OPEN, FULL, ARCHIVED = "open", "full", "archived"


def project_title(prefix: str, kind: str, shard: int = 1) -> str:
    """The title of a kind's `shard`-th project: '<prefix> <kind>' for the first, '<prefix> <kind> <n>' after."""
    return f"{prefix} {kind}" if shard == 1 else f"{prefix} {kind} {shard}"


def parse_title(prefix: str, title: str) -> tuple[str, int] | None:
    """(kind, shard) of a title `project_title` made with this prefix, else None."""
    m = re.fullmatch(re.escape(prefix) + r" (\w+)(?: (\d+))?", title or "")
    if m is None or m.group(1) not in KINDS:
        return None
    return m.group(1), int(m.group(2) or 1)


def list_projects(client: CrowdClient, title: str | None = None, include: str | None = None) -> list[dict[str, Any]]:
    """Projects of the token's organization; `title`: only those whose title contains it (Label Studio's filter,
    case-insensitive); `include`: a comma-separated field list, to spare the server the other counts."""
    out, page = [], 1
    extra = {k: v for k, v in (("title", title), ("include", include)) if v}
    while True:
        body = client.get_json("/api/projects/", page=page, page_size=100, **extra)
        results = body.get("results", []) if isinstance(body, dict) else body
        out += results
        if not isinstance(body, dict) or not body.get("next"):
            return out
        page += 1


def find_project(client: CrowdClient, title: str) -> dict[str, Any] | None:
    found = [p for p in list_projects(client, title=title) if p.get("title") == title]
    if len(found) > 1:
        raise CrowdError(
            f"{len(found)} Label Studio projects are titled {title!r} (ids {[p['id'] for p in found]}); "
            "delete or rename the extras so provisioning knows which one is ours"
        )
    return found[0] if found else None


def ensure_project(
    client: CrowdClient, title: str, label_config: str, *, overlap: int, description: str = "",
    image_dir: str | Path | None = None, project_settings: dict[str, Any] | None = None, update_overlap: bool = False,
) -> int:
    """The id of the project titled `title`, created with `overlap`, or updated so its config and settings match.
    An existing project keeps its overlap (`maximum_annotations`) unless `update_overlap`: Label Studio applies a new
    one to every task the project already holds. project_settings: a kind's own project settings over
    PROJECT_DEFAULTS (see TaskKind.extra["project"])."""
    want = {"label_config": label_config, "maximum_annotations": int(overlap), **PROJECT_DEFAULTS,
            **(project_settings or {})}
    proj = find_project(client, title)
    if proj is None:
        created = client.call(f"create project {title!r}", client.sdk.projects.create, title=title,
                              description=description, **want)
        pid = int(created.id)
        log.info("created project %s (%s, overlap %d)", pid, title, overlap)
    else:
        pid = int(proj["id"])
        if not update_overlap:
            have = int(proj.get("maximum_annotations") or 1)
            if have != int(overlap):
                log.info("project %s (%s) keeps its overlap %d (asked %d): pushed tasks keep theirs", pid, title,
                         have, overlap)
            want.pop("maximum_annotations")
        changed = {k: v for k, v in want.items() if proj.get(k) != v and not (k == "label_config" and _same_xml(proj.get(k), v))}
        if changed:
            client.call(f"update project {title!r}", client.sdk.projects.update, id=pid, **changed)
            log.info("updated project %s: %s", pid, sorted(changed))
    if image_dir is not None:
        ensure_local_storage(client, pid, Path(image_dir))
    return pid


def _same_xml(a: str | None, b: str) -> bool:
    return a is not None and " ".join(a.split()) == " ".join(b.split())


def ensure_local_storage(client: CrowdClient, project_id: int, root: Path) -> int:
    """A local-files import storage on `root`: Label Studio only serves /data/local-files/ paths that lie
    under a storage of a project the user can see. It is never synced; tasks come from push. `root` must be
    below (not equal to) the server's LOCAL_FILES_DOCUMENT_ROOT."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    existing = client.get_json("/api/storages/localfiles/", project=project_id)
    for s in existing:
        if Path(s.get("path", "")).resolve() == root:
            return int(s["id"])
    body = {"project": project_id, "path": str(root), "title": "synsetforge store", "use_blob_urls": True,
            "regex_filter": r".*\.(jpe?g|png|gif|webp|bmp)$"}
    resp = client.request("POST", "/api/storages/localfiles/", "create local-files storage", json=body)
    return int(resp.json()["id"])


def image_dir_of(store: Any) -> Path | None:
    """Where a local store keeps image blobs (served by Label Studio's local-files endpoint); None for S3."""
    from pipeline.store import LocalStore

    return store.root / "blobs" if isinstance(store, LocalStore) else None


def ensure_bucket_cors(store: Any, origin: str) -> bool:
    """With an S3 store, annotators' browsers fetch presigned image URLs cross-origin from the Label Studio page:
    the bucket must allow GET from that origin, or the annotator sees "There was an issue loading URL"."""
    from pipeline.store import S3Store

    if not isinstance(store, S3Store):
        return False
    origin = origin.rstrip("/")
    rules = []
    try:
        rules = store.client.get_bucket_cors(Bucket=store.bucket).get("CORSRules", [])
    except Exception:  # noqa: BLE001 - NoSuchCORSConfiguration: start from none
        rules = []
    if any(origin in r.get("AllowedOrigins", []) and "GET" in r.get("AllowedMethods", []) for r in rules):
        return False
    rules.append({"AllowedOrigins": [origin], "AllowedMethods": ["GET", "HEAD"], "AllowedHeaders": ["*"],
                  "MaxAgeSeconds": 3600})
    try:
        store.client.put_bucket_cors(Bucket=store.bucket, CORSConfiguration={"CORSRules": rules})
    except Exception as exc:
        # MinIO has no per-bucket CORS API: its server-wide MINIO_API_CORS_ALLOW_ORIGIN setting applies instead.
        if getattr(exc, "response", {}).get("Error", {}).get("Code") == "NotImplemented":
            log.warning("the S3 server has no bucket CORS API; make sure it allows GET from %s", origin)
            return False
        raise
    return True


def cors_origin(settings: Any, client: CrowdClient) -> str:
    """The origin annotators' browsers load Label Studio from: crowd.public_url behind a proxy, else its URL."""
    return settings.crowd.public_url or client.url


def provision(client: CrowdClient, settings: Any, *, kinds: list[str] | None = None, overlap: int | None = None,
              image_dir: str | Path | None = None, store: Any = None) -> dict[str, int]:
    """{kind: project_id} of an open project of each kind with `overlap` (default crowd.default_overlap): one that
    has room for tasks, else a new '<prefix> <kind> <n>'. Never changes the overlap of a project. With `store`, the
    projects are recorded in its `projects` table. image_dir: see `image_dir_of`."""
    cs = settings.crowd
    table = sync_projects(client, store, settings)
    out = {}
    for name in kinds or ["verify"]:
        pid, table = open_project(client, store, settings, table, name, int(overlap or cs.default_overlap),
                                  image_dir=image_dir)
        out[name] = pid
    return out


# -- the projects table: sharded projects, one overlap each ----------------------------------------------------
def empty_projects() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in (
        ("project_id", "int64"), ("kind", object), ("overlap", "int64"), ("shard", "int64"), ("title", object),
        ("n_tasks", "int64"), ("state", object), ("watermark", "datetime64[us, UTC]"),
        ("pulled_at", "datetime64[us, UTC]"), ("updated_at", "datetime64[us, UTC]"))})


def project_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows of the projects table as a frame with its column types (timestamps in UTC, NaT where unknown)."""
    df = pd.DataFrame(rows, columns=PROJECT_COLUMNS)
    for c in ("watermark", "pulled_at", "updated_at"):
        df[c] = pd.to_datetime(df[c], utc=True).astype("datetime64[us, UTC]")
    return df


def add_projects(table: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    new = project_rows(rows)
    return pd.concat([table, new], ignore_index=True) if len(table) else new


def read_projects(store: Any) -> pd.DataFrame:
    """The store's `projects` table (empty, with its columns, when there is none)."""
    if store is None or not store.has_table("projects"):
        return empty_projects()
    df = store.read_table("projects").to_pandas()
    return df if len(df) else empty_projects()


def write_projects(store: Any, table: pd.DataFrame) -> None:
    """Replace the `projects` table (a few hundred rows at most: one per project). A concurrent writer since this
    store's read makes it raise TableConflict (retried by the DAG task), so no watermark or state is lost."""
    if store is None:
        return
    store.write_table("projects", table[PROJECT_COLUMNS].sort_values("project_id").reset_index(drop=True))


def server_projects(client: CrowdClient, prefix: str) -> pd.DataFrame:
    """project_id, title, kind, shard, overlap, n_tasks of the server's projects titled by `project_title` with this
    prefix (one listing, only the fields needed)."""
    rows = []
    for p in list_projects(client, title=prefix, include="id,title,task_number,maximum_annotations"):
        parsed = parse_title(prefix, p.get("title") or "")
        if parsed is None:
            continue
        rows.append({"project_id": int(p["id"]), "title": p["title"], "kind": parsed[0], "shard": parsed[1],
                     "overlap": int(p.get("maximum_annotations") or 1), "n_tasks": int(p.get("task_number") or 0)})
    return pd.DataFrame(rows, columns=["project_id", "title", "kind", "shard", "overlap", "n_tasks"])


def sync_projects(client: CrowdClient, store: Any, settings: Any, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The projects table brought up to date with the server (one listing): projects found by title and not yet
    recorded (made before a crash, by `provision` without a store, or before projects were sharded) are added; task
    counts are refreshed; a project at crowd.project_size becomes full; a recorded project the server no longer has
    is archived (nothing left to pull). Archived projects stay archived. Returns the table (not written)."""
    cs = settings.crowd
    table = read_projects(store) if table is None else table
    remote = server_projects(client, cs.project_prefix)
    now = pd.Timestamp.now(tz="UTC").floor("us")
    known = dict(zip(table["project_id"].astype("int64"), table.index, strict=True))
    table = table.copy()
    added = []
    for r in remote.itertuples(index=False):
        if r.project_id in known:
            i = known[r.project_id]
            table.loc[i, ["n_tasks", "overlap"]] = [r.n_tasks, r.overlap]
            continue
        added.append({"project_id": r.project_id, "kind": r.kind, "overlap": r.overlap, "shard": r.shard,
                      "title": r.title, "n_tasks": r.n_tasks, "state": OPEN, "watermark": pd.NaT, "pulled_at": pd.NaT,
                      "updated_at": now})
    if added:
        table = add_projects(table, added)
        log.info("recorded %d Label Studio project(s) found on the server: %s", len(added),
                 ", ".join(f"{a['project_id']} ({a['title']})" for a in added))
    gone = ~table["project_id"].isin(set(remote["project_id"])) & (table["state"] != ARCHIVED) & \
        table["title"].map(lambda t: parse_title(cs.project_prefix, t) is not None)
    if gone.any():
        log.warning("project(s) %s are no longer on the server: archived", table.loc[gone, "project_id"].tolist())
        table.loc[gone, ["state", "updated_at"]] = [ARCHIVED, now]
    full = (table["state"] == OPEN) & (table["n_tasks"] >= cs.project_size)
    table.loc[full, ["state", "updated_at"]] = [FULL, now]
    return table.reset_index(drop=True)


def active_projects(table: pd.DataFrame, kinds: list[str] | None = None) -> pd.DataFrame:
    """Rows of the projects that may still get annotations (open or full, not archived), of `kinds` if given."""
    t = table[table["state"] != ARCHIVED]
    return t[t["kind"].isin(kinds)] if kinds is not None else t


def open_project(client: CrowdClient, store: Any, settings: Any, table: pd.DataFrame, kind: str, overlap: int, *,
                 image_dir: str | Path | None = None, prefer: int | None = None,
                 room: int = 1) -> tuple[int, pd.DataFrame]:
    """(project id, table): an open project of `kind` with `overlap` that has room for `room` more tasks (`prefer`
    if it qualifies, else the lowest-numbered one), else a new project '<prefix> <kind> <n>' with the next n,
    created with this overlap and the settings (and instructions) of the kind's newest project. The table is
    written when a project is added."""
    cs = settings.crowd
    mine = table[(table["kind"] == kind) & (table["overlap"] == overlap) & (table["state"] == OPEN)
                 & (table["n_tasks"] + room <= cs.project_size)]
    if len(mine):
        if prefer is not None and int(prefer) in set(mine["project_id"]):
            return int(prefer), table
        return int(mine.sort_values("shard")["project_id"].iloc[0]), table
    siblings = table[table["kind"] == kind]
    shard = int(siblings["shard"].max()) + 1 if len(siblings) else 1
    title = project_title(cs.project_prefix, kind, shard)
    k = KINDS[kind]
    extra = dict(k.extra.get("project") or {})
    if len(siblings):  # annotators read the same instructions in every project of the kind
        newest = int(siblings.sort_values("shard")["project_id"].iloc[-1])
        try:
            proj = client.get_json(f"/api/projects/{newest}/")
            if proj.get("expert_instruction"):
                extra.update(expert_instruction=proj["expert_instruction"],
                             show_instruction=bool(proj.get("show_instruction")))
        except CrowdError as exc:
            if exc.status != 404:
                raise
    pid = ensure_project(client, title, k.label_config, overlap=overlap,
                         description=f"{k.description} ({overlap} annotation{'s' if overlap != 1 else ''} per task)",
                         image_dir=image_dir, project_settings=extra)
    proj = client.get_json(f"/api/projects/{pid}/")
    now = pd.Timestamp.now(tz="UTC").floor("us")
    row = {"project_id": pid, "kind": kind, "overlap": int(proj.get("maximum_annotations") or overlap), "shard": shard,
           "title": title, "n_tasks": int(proj.get("task_number") or 0), "state": OPEN, "watermark": pd.NaT,
           "pulled_at": pd.NaT, "updated_at": now}
    table = add_projects(table[table["project_id"] != pid], [row])
    if row["overlap"] != overlap:  # a project of that title existed with another overlap: never changed
        log.warning("project %s (%s) has overlap %d, not %d", pid, title, row["overlap"], overlap)
        write_projects(store, table)
        return open_project(client, store, settings, table, kind, overlap, image_dir=image_dir, room=room)
    write_projects(store, table)
    log.info("opened project %s (%s): overlap %d, up to %d tasks", pid, title, overlap, cs.project_size)
    return pid, table


def kind_project_ids(client: CrowdClient, settings: Any, kind: str, store: Any = None) -> list[int]:
    """Ids of the kind's projects that may still get annotations, lowest number first (annotators, simulated or
    not, work in all of them). From the store's projects table when given, else from the server's titles."""
    table = sync_projects(client, store, settings) if store is not None else server_projects(
        client, settings.crowd.project_prefix).assign(state=OPEN)
    t = active_projects(table, [kind]).sort_values("shard")
    return [int(p) for p in t["project_id"]]
