"""Idempotent provisioning: projects found by title (created or updated to the config file and overlap),
local-files storage for images, and annotator accounts.

    >>> project_title("synsetforge", "verify")
    'synsetforge verify'
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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


def project_title(prefix: str, kind: str) -> str:
    return f"{prefix} {kind}"


def list_projects(client: CrowdClient) -> list[dict[str, Any]]:
    out, page = [], 1
    while True:
        body = client.get_json("/api/projects/", page=page, page_size=100)
        results = body.get("results", []) if isinstance(body, dict) else body
        out += results
        if not isinstance(body, dict) or not body.get("next"):
            return out
        page += 1


def find_project(client: CrowdClient, title: str) -> dict[str, Any] | None:
    found = [p for p in list_projects(client) if p.get("title") == title]
    if len(found) > 1:
        raise CrowdError(
            f"{len(found)} Label Studio projects are titled {title!r} (ids {[p['id'] for p in found]}); "
            "delete or rename the extras so provisioning knows which one is ours"
        )
    return found[0] if found else None


def ensure_project(
    client: CrowdClient, title: str, label_config: str, *, overlap: int, description: str = "",
    image_dir: str | Path | None = None, project_settings: dict[str, Any] | None = None,
) -> int:
    """The id of the project titled `title`, created or updated so config and overlap match.
    project_settings: a kind's own project settings over PROJECT_DEFAULTS (see TaskKind.extra["project"])."""
    want = {"label_config": label_config, "maximum_annotations": int(overlap), **PROJECT_DEFAULTS,
            **(project_settings or {})}
    proj = find_project(client, title)
    if proj is None:
        created = client.call(f"create project {title!r}", client.sdk.projects.create, title=title,
                              description=description, **want)
        pid = int(created.id)
        log.info("created project %s (%s)", pid, title)
    else:
        pid = int(proj["id"])
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
              image_dir: str | Path | None = None) -> dict[str, int]:
    """Ensure one project per kind; returns {kind: project_id}. image_dir: see `image_dir_of`."""
    cs = settings.crowd
    out = {}
    for name in kinds or ["verify"]:
        kind = KINDS[name]
        out[name] = ensure_project(client, project_title(cs.project_prefix, name), kind.label_config,
                                   overlap=overlap or cs.default_overlap, description=kind.description,
                                   image_dir=image_dir, project_settings=kind.extra.get("project"))
    return out
