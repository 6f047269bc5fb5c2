"""The box loop on a real Label Studio: three projects (draw, quality, coverage), push, pull, reconcile.

Built on the crowd package (client with retries, idempotent project provisioning, image URLs, pseudonyms,
annotator accounts); the decisions are pipeline/boxes.py's pure state machine. One `sync` step is

    adopt  : server tasks missing from `box_tasks` (a crash after the import call) are recorded, from the
             task data, which carries the whole box_tasks row;
    pull   : new annotations -> `box_answers` (draw: Label Studio percent -> stored-image pixels, rotation,
             degenerate and out-of-image boxes rejected with a reason; quality/coverage: yes/no);
    plan   : replay the tables -> `boxes`, `coverage`, the next tasks;
    push   : import the next tasks (accepted boxes as read-only pre-annotations) unless their request_id
             is already on the server, then record them in `box_tasks`.

Every step is idempotent: a rerun, or a run after a crash anywhere, neither loses nor duplicates a task or
an answer. Images are served like the verification tasks' (Label Studio local files, or presigned S3).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from crowd.client import CrowdClient, CrowdError
from crowd.kinds import BadAnnotation, choices_answer, load_config
from pipeline.boxes import (
    BOX_COLUMNS,
    BOX_TABLES,
    BoxesSettings,
    BoxTables,
    box_settings,
    empty_frame,
    extreme_points_to_box,
    pixels_to_percent,
    records,
    region_to_box,
    run_plan,
    summarize,
)
from pipeline.store import Store

log = logging.getLogger("synsetforge.boxes")

MODEL_VERSION = "synsetforge-shown-boxes"  # pre-annotations of this version are shown to annotators
CONFIGS = {"draw": "box_draw.xml", "extreme": "extreme.xml", "quality": "box_quality.xml",
           "coverage": "box_coverage.xml"}
SHOWN = {"draw": ("accepted", "already boxed"), "extreme": ("accepted", "already boxed"),
         "quality": ("shown", "box to judge"), "coverage": ("shown", "boxed")}
DESCRIPTIONS = {
    "draw": "draw one box around one object of the synset that has no box yet",
    "extreme": "click the four extreme points (top, bottom, left, right) of one object of the synset with no box yet",
    "quality": "is this box tight around one whole object of the synset?",
    "coverage": "does every object of the synset have a box?",
}


def project_title(prefix: str, kind: str, stem: str = "box") -> str:
    return f"{prefix} {stem}-{kind}"


def loop_kinds(tables: BoxTables = BOX_TABLES) -> list[str]:
    """The task kinds (one Label Studio project each) of a box loop: its way of making a box, quality, coverage."""
    return [tables.draw_kind, "quality", "coverage"]


def provision_boxes(client: CrowdClient, settings: Any, store: Store, policy: BoxesSettings | None = None,
                    tables: BoxTables = BOX_TABLES) -> dict[str, int]:
    """The loop's three box projects, created or updated (config, overlap, pre-annotations shown); {kind: id}."""
    from crowd.provision import ensure_project, image_dir_of

    policy = policy or box_settings(settings)
    cs = settings.crowd
    overlap = {tables.draw_kind: policy.draw_overlap, "quality": policy.quality_overlap,
               "coverage": policy.coverage_overlap}
    out = {}
    for kind in loop_kinds(tables):
        config = CONFIGS[kind]
        pid = ensure_project(client, project_title(cs.project_prefix, kind, tables.project_stem), load_config(config),
                             overlap=overlap[kind], description=DESCRIPTIONS[kind], image_dir=image_dir_of(store))
        # Annotators see predictions as a read-only starting point (the version is set once some exist).
        client.request("PATCH", f"/api/projects/{pid}/", f"enable pre-annotations on project {pid}",
                       json={"show_collab_predictions": True})
        _ensure_model_version(client, pid)
        out[kind] = pid
    return out


def _ensure_model_version(client: CrowdClient, project_id: int) -> bool:
    """Point the project's pre-labelling at our predictions; Label Studio refuses a version no prediction
    carries yet, so this is retried after every import."""
    project = client.get_json(f"/api/projects/{project_id}/")
    if project.get("model_version") == MODEL_VERSION:
        return True
    try:
        client.request("PATCH", f"/api/projects/{project_id}/", f"set model version on project {project_id}",
                       json={"model_version": MODEL_VERSION})
    except CrowdError as exc:
        if exc.status == 400:  # the only field sent is model_version: no prediction carries it yet
            return False  # the first import with shown boxes sets it
        raise
    return True


# ------------------------------------------------------------------------------------------------ push
def shown_regions(kind: str, boxes: list[tuple[str, list[float]]], width: int, height: int) -> list[dict[str, Any]]:
    """Label Studio result items (read-only rectangles) for boxes given in stored-image pixels."""
    from_name, label = SHOWN[kind]
    out = []
    for box_id, (x0, y0, x1, y1) in boxes:
        value = {**pixels_to_percent(x0, y0, x1, y1, width, height), "rotation": 0, "rectanglelabels": [label]}
        out.append({"id": box_id[:10], "from_name": from_name, "to_name": "image", "type": "rectanglelabels",
                    "original_width": int(width), "original_height": int(height), "image_rotation": 0,
                    "readonly": True, "value": value})
    return out


def task_payload(action: Mapping[str, Any], *, image_url: str, lemmas: str, gloss: str, width: int, height: int,
                 geometry: Mapping[str, list[float]]) -> dict[str, Any]:
    """One import item: task data (with the full box_tasks row for adoption) and the shown boxes."""
    shown_ids = [str(b) for b in action["shown_box_ids"]]
    data = {"image": image_url, "lemmas": lemmas, "gloss": gloss, "request_id": action["request_id"],
            "image_id": action["image_id"], "wnid": action["wnid"], "kind": action["kind"], "seq": int(action["seq"]),
            "box_id": action["box_id"] if isinstance(action["box_id"], str) else None, "shown_box_ids": shown_ids,
            "overlap": int(action["overlap"]), "width": int(width), "height": int(height)}
    item: dict[str, Any] = {"data": data, "overlap": int(action["overlap"])}
    regions = shown_regions(action["kind"], [(b, geometry[b]) for b in shown_ids], width, height)
    if regions:
        item["predictions"] = [{"model_version": MODEL_VERSION, "score": 1.0, "result": regions}]
    return item


def _row_from_data(task_id: int, project_id: int, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"task_id": int(task_id), "project_id": int(project_id), "request_id": data["request_id"],
            "image_id": data["image_id"], "wnid": data["wnid"], "seq": int(data["seq"]), "kind": data["kind"],
            "box_id": data.get("box_id"), "shown_box_ids": list(data.get("shown_box_ids") or []),
            "overlap": int(data["overlap"]), "pushed_at": datetime.now(UTC)}


def _read(store: Store, name: str) -> pd.DataFrame:
    df = store.read_table(name, missing_ok=True).to_pandas()
    return df if len(df) else empty_frame(name)


def _append(store: Store, name: str, old: pd.DataFrame, new: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """Append the rows of `new` whose key is neither in `old` nor already in the table (one commit of the new
    rows only, atomic against other writers); returns old + the rows appended."""
    if not len(new):
        return old
    fresh = new.drop_duplicates(subset=key, keep="first")
    if len(old):
        fresh = fresh[~pd.MultiIndex.from_frame(fresh[key]).isin(pd.MultiIndex.from_frame(old[key]))]
    if not len(fresh):
        return old
    added = store.append_table(name, fresh, unique_by=key).to_pandas()
    return pd.concat([old, added], ignore_index=True) if len(old) else added


def remote_tasks(client: CrowdClient, projects: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """request_id -> {task_id, project_id, data} for every box task on the server."""
    out: dict[str, dict[str, Any]] = {}
    for pid in projects.values():
        for t in client.iter_tasks(pid, fields="all"):
            data = t.get("data") or {}
            rid = data.get("request_id")
            if rid is None:
                continue
            if rid in out:
                log.error("request %s exists twice on the server (tasks %s and %s); the later one is ignored",
                          rid, out[rid]["task_id"], t["id"])
                continue
            out[rid] = {"task_id": int(t["id"]), "project_id": pid, "data": data}
    return out


def adopt(store: Store, client: CrowdClient, projects: Mapping[str, int], tables: BoxTables = BOX_TABLES
          ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Record server tasks `box_tasks` misses (pushed just before a crash); returns (box_tasks, remote)."""
    tasks = _read(store, tables.tasks)
    remote = remote_tasks(client, projects)
    known = set(tasks["request_id"]) if len(tasks) else set()
    rows = [_row_from_data(r["task_id"], r["project_id"], r["data"]) for rid, r in remote.items() if rid not in known]
    if rows:
        log.info("adopting %d box task(s) pushed before a crash", len(rows))
        tasks = _append(store, tables.tasks, tasks, pd.DataFrame(rows, columns=list(tasks.columns)), ["request_id"])
    return tasks, remote


def push_box_tasks(
    store: Store, client: CrowdClient, settings: Any, projects: Mapping[str, int], actions: pd.DataFrame,
    boxes: pd.DataFrame, *, remote: Mapping[str, Any] | None = None, batch_size: int = 200,
    tables: BoxTables = BOX_TABLES,
) -> int:
    """Import `actions` (from pipeline.boxes.plan) not yet on the server; record them in box_tasks."""
    from crowd.push import image_url_resolver

    if actions.empty:
        return 0
    remote = remote if remote is not None else remote_tasks(client, projects)
    todo = actions[~actions["request_id"].isin(set(remote))]
    tasks = _read(store, tables.tasks)
    if len(todo) < len(actions):  # already on the server: only make sure the table has them
        rows = [_row_from_data(remote[r]["task_id"], remote[r]["project_id"], remote[r]["data"])
                for r in actions["request_id"] if r in remote]
        tasks = _append(store, tables.tasks, tasks, pd.DataFrame(rows, columns=list(tasks.columns)), ["request_id"])
    if todo.empty:
        return 0
    images = store.read_table("images").to_pandas()
    images = images[images["image_id"].notna() & images["storage_key"].notna()].drop_duplicates("image_id")
    dims = {r["image_id"]: (int(r["width"]), int(r["height"])) for r in records(images[["image_id", "width", "height"]])}
    synsets = {r["wnid"]: r for r in records(store.read_table("synsets").to_pandas())}
    cs = settings.crowd
    url_of = image_url_resolver(store, images, files_root=cs.files_root, expiry_s=cs.image_url_expiry_s)
    geometry = {r["box_id"]: [r[c] for c in BOX_COLUMNS] for r in records(boxes)}
    payload, problems = [], []
    for a in records(todo):
        syn, dim = synsets.get(a["wnid"]), dims.get(a["image_id"])
        if syn is None or dim is None:
            problems.append(f"{a['image_id']}/{a['wnid']}: " + ("unknown synset" if syn is None else "unknown image"))
            continue
        payload.append(task_payload(a, image_url=url_of(a["image_id"]), lemmas=", ".join(syn["lemmas"]),
                                    gloss=syn["gloss"], width=dim[0], height=dim[1], geometry=geometry))
    if problems:
        raise CrowdError(f"{len(problems)} box task(s) name an image or synset the store lacks (first: {problems[:3]}); "
                         "run ingest/vocabulary first; nothing was pushed")
    pushed = 0
    for kind, pid in projects.items():
        items = [p for p in payload if p["data"]["kind"] == kind]
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            ids = client.import_tasks(
                pid, batch, lambda pid=pid, kind=kind: {r: t["task_id"] for r, t in remote_tasks(client, {kind: pid}).items()},
                what=f"the import of {len(batch)} {kind} task(s)")
            if any(i is None for i in ids):
                raise CrowdError(f"Label Studio at {client.url} accepted the import of {kind} tasks but lists "
                                 f"{sum(i is None for i in ids)} of them nowhere; rerun `synsetforge boxes sync`")
            rows = [_row_from_data(i, pid, b["data"]) for i, b in zip(ids, batch, strict=True)]
            tasks = _append(store, tables.tasks, tasks, pd.DataFrame(rows, columns=list(tasks.columns)), ["request_id"])
            pushed += len(rows)
        if any("predictions" in p for p in items):
            _ensure_model_version(client, pid)
    return pushed


# ------------------------------------------------------------------------------------------------ pull
def parse_answer(kind: str, result: Any, width: int, height: int, min_size_px: float) -> dict[str, Any]:
    """One annotation's result -> answer, pixel box and reject reason (the box_answers columns).

    >>> r = [{"from_name": "box", "type": "rectangle", "value": {"x": 10, "y": 20, "width": 50, "height": 40}}]
    >>> parse_answer("draw", r, 200, 100, 2.0)["x_max"]
    120.0
    >>> pts = [{"from_name": "points", "type": "keypointlabels", "value": {"x": x, "y": y, "width": 0.5}}
    ...        for x, y in ((50, 10), (20, 50), (50, 90), (80, 40))]
    >>> [parse_answer("extreme", pts, 200, 100, 2.0)[c] for c in ("x_min", "y_min", "x_max", "y_max")]
    [40.0, 10.0, 160.0, 90.0]
    """
    out: dict[str, Any] = {"answer": "invalid", "reject_reason": None, **dict.fromkeys(BOX_COLUMNS)}
    if kind == "extreme":
        clicked = [r for r in result or [] if isinstance(r, dict) and r.get("from_name") == "points"
                   and not r.get("readonly")] if isinstance(result, list) else None
        if clicked is None:
            out["reject_reason"] = f"result is {type(result).__name__}, expected a list"
            return out
        values = [r.get("value") if isinstance(r.get("value"), dict) else {} for r in clicked]
        box, reason = extreme_points_to_box(values, width, height, min_size_px=min_size_px)
        if box is None:
            out["reject_reason"] = reason
        else:
            out.update(answer="box", **dict(zip(BOX_COLUMNS, box, strict=True)))
        return out
    if kind == "draw":
        drawn = [r for r in result or [] if isinstance(r, dict) and r.get("from_name") == "box"
                 and not r.get("readonly")] if isinstance(result, list) else None
        if drawn is None:
            out["reject_reason"] = f"result is {type(result).__name__}, expected a list"
        elif len(drawn) != 1:
            out["reject_reason"] = f"{len(drawn)} boxes drawn; draw exactly one"
        else:
            value = drawn[0].get("value")
            box, reason = region_to_box(value if isinstance(value, dict) else {}, width, height, min_size_px=min_size_px)
            if box is None:
                out["reject_reason"] = reason
            else:
                out.update(answer="box", **dict(zip(BOX_COLUMNS, box, strict=True)))
        return out
    try:
        out["answer"] = choices_answer(result, "answer", ("yes", "no"))
    except BadAnnotation as exc:  # counted as an answer that is not a yes: a broken vote never accepts a box
        out["reject_reason"] = str(exc)
    return out


def annotations_to_answers(export: list[dict[str, Any]], tasks: pd.DataFrame, seen: set[int],
                           worker_of: Mapping[int, str], key: bytes, min_size_px: float) -> pd.DataFrame:
    """Pure core of the pull: new box_answers rows from a project's JSON export."""
    from crowd.pull import _ts, pseudonym

    by_task = {r["task_id"]: r for r in records(tasks[["task_id", "image_id", "wnid", "kind"]])} if len(tasks) else {}
    rows = []
    for task in export:
        rec = by_task.get(int(task["id"]))
        if rec is None:
            continue  # not ours yet: adopt runs first, so this is a task of someone else
        data = task.get("data") or {}
        for ann in task.get("annotations") or []:
            aid = ann.get("id")
            if aid is None or int(aid) in seen or ann.get("was_cancelled"):
                continue
            who = ann.get("completed_by")
            uid = who.get("id") if isinstance(who, dict) else who
            email = (who.get("email") if isinstance(who, dict) else None) or \
                (worker_of.get(int(uid), f"ls-user-{uid}") if uid is not None else "ls-user-unknown")
            parsed = parse_answer(rec["kind"], ann.get("result"), int(data.get("width") or 0),
                                  int(data.get("height") or 0), min_size_px)
            lead = ann.get("lead_time")
            rows.append({"annotation_id": int(aid), "task_id": rec["task_id"], "image_id": rec["image_id"],
                         "wnid": rec["wnid"], "kind": rec["kind"], "worker": pseudonym(email, key), **parsed,
                         "lead_time_s": float(lead) if lead is not None else None,
                         "submitted_at": _ts(ann.get("created_at"))})
    return pd.DataFrame(rows, columns=list(empty_frame("box_answers").columns))


def pull_box_answers(store: Store, client: CrowdClient, settings: Any, projects: Mapping[str, int],
                     tasks: pd.DataFrame | None = None, policy: BoxesSettings | None = None,
                     tables: BoxTables = BOX_TABLES) -> int:
    """Append new annotations of the box projects to box_answers; a rerun adds nothing."""
    from crowd.pull import pseudonym_key, user_emails

    policy = policy or box_settings(settings)
    key = pseudonym_key(settings)
    tasks = tasks if tasks is not None else _read(store, tables.tasks)
    answers = _read(store, tables.answers)
    seen = set(answers["annotation_id"].astype("int64")) if len(answers) else set()
    worker_of = user_emails(client)
    new = [annotations_to_answers(client.export_json(pid), tasks, seen, worker_of, key, policy.min_size_px)
           for pid in projects.values()]
    new = [n for n in new if len(n)]
    if not new:
        return 0
    fresh = pd.concat(new, ignore_index=True)
    _append(store, tables.answers, answers, fresh, ["annotation_id"])
    bad = fresh[fresh["reject_reason"].notna()]
    if len(bad):
        log.info("%d drawn box(es) or vote(s) unusable: %s", len(bad), bad["reject_reason"].value_counts().head().to_dict())
    return len(fresh)


# ------------------------------------------------------------------------------------------------ sync
def admin_from_settings(settings: Any) -> CrowdClient:
    cs = settings.crowd
    if not cs.url or cs.token is None:
        raise CrowdError("crowd.url and crowd.token must be set (SYNSETFORGE__CROWD__URL / __TOKEN) for the box loop")
    return CrowdClient(cs.url, cs.token.get_secret_value(), retries=cs.retries)


def sync(store: Store, settings: Any, *, steps: int = 1, client: CrowdClient | None = None,
         pairs: pd.DataFrame | None = None, policy: BoxesSettings | None = None,
         tables: BoxTables = BOX_TABLES) -> dict[str, Any]:
    """adopt -> pull -> plan -> push, `steps` times; returns the last plan's summary and the counts."""
    policy = policy or box_settings(settings)
    client = client or admin_from_settings(settings)
    projects = provision_boxes(client, settings, store, policy, tables)
    pulled = pushed = 0
    result = None
    for _ in range(steps):
        tasks, remote = adopt(store, client, projects, tables)
        pulled += pull_box_answers(store, client, settings, projects, tasks, policy, tables)
        result = run_plan(store, policy, pairs, tables)
        n = push_box_tasks(store, client, settings, projects, result.actions, result.boxes, remote=remote,
                           tables=tables)
        if n:  # replay once more so `coverage` shows the pushed tasks as waiting
            result = run_plan(store, policy, pairs, tables)
        pushed += n
    assert result is not None
    return {"projects": projects, "pulled": pulled, "pushed": pushed, "open_actions": len(result.actions),
            **summarize(result.coverage, result.boxes)}


# ------------------------------------------------------------------------------------- simulated workers
def render_answer(kind: str, ans: Any, width: int, height: int) -> list[dict[str, Any]]:
    """A Label Studio result for a simulated answer (crowd.simulate_boxes.SimAnswer)."""
    if kind == "draw":
        return [{"from_name": "box", "to_name": "image", "type": "rectangle", "original_width": width,
                 "original_height": height, "image_rotation": 0, "value": ans.value}]
    if kind == "extreme":
        return [{"from_name": "points", "to_name": "image", "type": "keypointlabels", "original_width": width,
                 "original_height": height, "image_rotation": 0,
                 "value": {"x": p["x"], "y": p["y"], "width": 0.5, "keypointlabels": ["extreme point"]}}
                for p in ans.value]
    return [{"from_name": "answer", "to_name": "image", "type": "choices", "value": {"choices": [ans.choice]}}]


def _shown_pixels(task: Mapping[str, Any], client: CrowdClient) -> np.ndarray:
    """The boxes the annotator sees, read back from the task's pre-annotations (as a person sees them)."""
    preds = task.get("predictions")
    if preds is None or (preds and not isinstance(preds[0], dict)):
        preds = client.get_json(f"/api/tasks/{task['id']}").get("predictions") or []
    data = task["data"]
    out = []
    for p in preds:
        for r in p.get("result") or []:
            box, _ = region_to_box(r.get("value") or {}, int(data["width"]), int(data["height"]), min_size_px=0)
            if box is not None:
                out.append(box)
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def work_boxes(workers: list[tuple[Any, Any]], projects: Mapping[str, int], truth: pd.DataFrame, *,
               seed: int = 0) -> dict[str, int]:
    """Simulated box workers take tasks from the three projects' next-task endpoints until none is left.

    workers: (crowd.simulate.Annotator, crowd.simulate_boxes.WorkerProfile) pairs; truth: true boxes
    (image_id, wnid, x_min, y_min, x_max, y_max). Returns annotations per worker email.
    """
    from crowd.simulate import next_task, submit
    from crowd.simulate_boxes import answer_task

    truth_by = {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby(["image_id", "wnid"])}
    done = {a.email: 0 for a, _ in workers}
    active = list(workers)
    while active:
        still = []
        for annotator, profile in active:
            did = False
            for kind, pid in projects.items():
                task = next_task(annotator.client, pid)
                if task is None:
                    continue
                data = task["data"]
                w, h = int(data["width"]), int(data["height"])
                rng = np.random.default_rng(int(hashlib.sha256(f"{seed}|{annotator.email}|{task['id']}".encode())
                                                .hexdigest()[:12], 16))
                shown = _shown_pixels(task, annotator.client)
                ans = answer_task(profile, kind, truth_by.get((data["image_id"], data["wnid"]), np.zeros((0, 4))),
                                  shown, w, h, rng)
                submit(annotator.client, int(task["id"]), pid, render_answer(kind, ans, w, h), round(ans.lead_time_s, 3))
                done[annotator.email] += 1
                did = True
                break  # one task per turn, as people working side by side
            if did:
                still.append((annotator, profile))
        random.Random(seed).shuffle(still)
        active = still
    return done


def run_until_done(store: Store, settings: Any, workers: list[tuple[Any, Any]], truth: pd.DataFrame, *,
                   client: CrowdClient, pairs: pd.DataFrame | None = None, policy: BoxesSettings | None = None,
                   seed: int = 0, max_rounds: int = 60, tables: BoxTables = BOX_TABLES) -> dict[str, Any]:
    """sync -> simulated work -> sync ... until the loop has nothing left to ask (the real-server evidence run)."""
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    annotations = 0
    for rounds in range(1, max_rounds + 1):
        summary = sync(store, settings, client=client, pairs=pairs, policy=policy, tables=tables)
        if summary["pushed"] == 0 and summary["open_actions"] == 0 and summary["waiting"] == 0:
            break
        annotations += sum(work_boxes(workers, summary["projects"], truth, seed=seed + rounds).values())
    else:
        raise CrowdError(f"box loop not finished after {max_rounds} rounds")
    return {**summary, "rounds": rounds, "annotations": annotations, "seconds": round(time.perf_counter() - t0, 1)}
