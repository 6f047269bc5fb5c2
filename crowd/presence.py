"""The DET presence loop on a real Label Studio: two projects (one yes/no question, a checklist), push, pull, adopt.

Built on the crowd package (client with retries, idempotent projects, image URLs, pseudonyms); the decisions are
pipeline/presence.py's pure replay. One `sync` step is

    adopt  : server tasks missing from `presence_tasks` (a crash after the import call) are recorded from the task
             data, which carries the whole row except a control's known answers (those come from presence_gold);
    pull   : new annotations -> `presence_votes`, one row per (annotation, node): a question gives one answer, a
             checklist a yes for each ticked item and a no for the others;
    plan   : replay the tables -> `presence_labels`, `det_images`, the next tasks;
    push   : import the next tasks unless their request_id is already on the server, then record them.

Every step is idempotent, as the box loop's are. Label Studio's open-source import ignores a per-task overlap, so a
project's `maximum_annotations` is raised (never lowered: a task would then wait for answers nobody is asked for)
to the largest overlap pushed; a task that gets more answers than it asked for just has more votes.

The DET box loop (every present class of a fully annotated image) is crowd.boxes with the DET tables
(`pipeline.boxes.det_box_tables`): `det_box_pairs` lists its pairs, `sync_det_boxes` runs one step.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from crowd.client import CrowdClient, CrowdError
from crowd.kinds import BadAnnotation, choices_answer, load_config
from pipeline.presence import (
    QuestionTree,
    det_settings,
    read_tree,
    run_presence_plan,
    summarize,
)
from pipeline.schemas import empty_table
from pipeline.store import Store

log = logging.getLogger("synsetforge.presence")

CONFIGS = {"question": "presence.xml", "checklist": "checklist.xml"}
DESCRIPTIONS = {
    "question": "DET presence: one yes/no question about the whole image",
    "checklist": "DET presence: tick every listed kind of object the image shows",
}
TASK_COLUMNS = [f.name for f in empty_table("presence_tasks").schema]
VOTE_COLUMNS = [f.name for f in empty_table("presence_votes").schema]


def project_title(prefix: str, kind: str) -> str:
    return f"{prefix} det-{kind}"


def provision_presence(client: CrowdClient, settings: Any, store: Store) -> dict[str, int]:
    """The question and checklist projects, created or updated; {kind: project id}."""
    from crowd.provision import ensure_project, image_dir_of

    cs = settings.crowd
    return {kind: ensure_project(client, project_title(cs.project_prefix, kind), load_config(config), overlap=2,
                                 description=DESCRIPTIONS[kind], image_dir=image_dir_of(store),
                                 project_settings={"enable_empty_annotation": kind == "checklist"})
            for kind, config in CONFIGS.items()}


# ------------------------------------------------------------------------------------------------ push
def checklist_heading(tree: QuestionTree, names: Mapping[str, str], parent_id: str | None) -> str:
    if parent_id is None:
        return "Which of these are in the photo? Tick every one you see."
    return f"Which kinds of {names.get(parent_id, parent_id)} are in the photo? Tick every one you see."


def task_data(action: Mapping[str, Any], *, image_url: str, tree: QuestionTree, names: Mapping[str, str]
              ) -> dict[str, Any]:
    """One task's data: what the annotator sees and the presence_tasks row (never a control's answers)."""
    nodes = [str(n) for n in action["node_ids"]]
    parent = action["parent_id"] if isinstance(action["parent_id"], str) else None
    data: dict[str, Any] = {
        "image": image_url, "request_id": action["request_id"], "image_id": action["image_id"],
        "kind": action["kind"], "seq": int(action["seq"]), "parent_id": parent, "node_ids": nodes,
        "is_gold": bool(action["is_gold"]), "overlap": int(action["overlap"]),
        "items": [{"node_id": n, "name": names.get(n, n), "question": tree.questions[tree.index[n]]} for n in nodes],
    }
    if action["kind"] == "question":
        data["question"] = tree.questions[tree.index[nodes[0]]]
    else:
        data["heading"] = checklist_heading(tree, names, parent)
    return data


def _row_from_data(task_id: int, project_id: int, data: Mapping[str, Any], gold: Mapping[tuple[str, str], str]
                   ) -> dict[str, Any]:
    nodes = [str(n) for n in data.get("node_ids") or []]
    is_gold = bool(data.get("is_gold"))
    answers = [gold.get((data["image_id"], n), "no") for n in nodes] if is_gold else []
    return {"task_id": int(task_id), "project_id": int(project_id), "request_id": data["request_id"],
            "image_id": data["image_id"], "seq": int(data["seq"]), "kind": data["kind"],
            "parent_id": data.get("parent_id"), "node_ids": nodes, "is_gold": is_gold, "gold_answers": answers,
            "overlap": int(data["overlap"]), "pushed_at": datetime.now(UTC)}


def _read(store: Store, name: str) -> pd.DataFrame:
    df = store.read_table(name, missing_ok=True).to_pandas()
    return df if len(df) else empty_table(name).to_pandas()


def _append(store: Store, name: str, old: pd.DataFrame, new: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """Append the rows of `new` whose key is neither in `old` nor in the table (one commit, atomic)."""
    if not len(new):
        return old
    fresh = new.drop_duplicates(subset=key, keep="first")
    if len(old):
        fresh = fresh[~pd.MultiIndex.from_frame(fresh[key]).isin(pd.MultiIndex.from_frame(old[key]))]
    if not len(fresh):
        return old
    added = store.append_table(name, fresh, unique_by=key).to_pandas()
    return pd.concat([old, added], ignore_index=True) if len(old) else added


def _gold_answers(store: Store) -> dict[tuple[str, str], str]:
    g = store.read_table("presence_gold", missing_ok=True).to_pandas()
    return {(i, n): str(a) for i, n, a in zip(g["image_id"], g["node_id"], g["answer"], strict=True)} if len(g) else {}


def remote_tasks(client: CrowdClient, projects: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """request_id -> {task_id, project_id, data} for every presence task on the server."""
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


def adopt(store: Store, client: CrowdClient, projects: Mapping[str, int]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Record server tasks `presence_tasks` misses (pushed just before a crash); returns (tasks, remote)."""
    tasks = _read(store, "presence_tasks")
    remote = remote_tasks(client, projects)
    known = set(tasks["request_id"]) if len(tasks) else set()
    missing = {rid: r for rid, r in remote.items() if rid not in known}
    if missing:
        gold = _gold_answers(store)
        rows = [_row_from_data(r["task_id"], r["project_id"], r["data"], gold) for r in missing.values()]
        log.info("adopting %d presence task(s) pushed before a crash", len(rows))
        tasks = _append(store, "presence_tasks", tasks, pd.DataFrame(rows, columns=TASK_COLUMNS), ["request_id"])
    return tasks, remote


def raise_overlap(client: CrowdClient, project_id: int, overlap: int) -> None:
    """Label Studio's open-source import ignores per-task overlap: the project's maximum_annotations is raised to
    `overlap` when lower (never lowered, see the module docstring)."""
    proj = client.get_json(f"/api/projects/{project_id}/")
    if int(proj.get("maximum_annotations") or 1) < overlap:
        client.call(f"set overlap of project {project_id}", client.sdk.projects.update, id=project_id,
                    maximum_annotations=overlap)


def push_presence(store: Store, client: CrowdClient, settings: Any, projects: Mapping[str, int],
                  actions: pd.DataFrame, *, remote: Mapping[str, Any] | None = None, batch_size: int = 200) -> int:
    """Import `actions` (from pipeline.presence.plan_presence) not yet on the server; record them."""
    from crowd.push import image_url_resolver

    if actions.empty:
        return 0
    remote = remote if remote is not None else remote_tasks(client, projects)
    gold = _gold_answers(store)
    tasks = _read(store, "presence_tasks")
    on_server = actions[actions["request_id"].isin(set(remote))]
    if len(on_server):  # already on the server: only make sure the table has them
        rows = [_row_from_data(remote[r]["task_id"], remote[r]["project_id"], remote[r]["data"], gold)
                for r in on_server["request_id"]]
        tasks = _append(store, "presence_tasks", tasks, pd.DataFrame(rows, columns=TASK_COLUMNS), ["request_id"])
    todo = actions[~actions["request_id"].isin(set(remote))]
    if todo.empty:
        return 0
    images = store.read_table("images", columns=["image_id", "storage_key"]).to_pandas()
    images = images[images["image_id"].notna() & images["storage_key"].notna()].drop_duplicates("image_id")
    cs = settings.crowd
    url_of = image_url_resolver(store, images, files_root=cs.files_root, expiry_s=cs.image_url_expiry_s)
    questions = store.read_table("det_questions").to_pandas()
    names = dict(zip(questions["node_id"], questions["name"], strict=True))
    tree = read_tree(store)
    payload, problems = [], []
    for a in todo.to_dict("records"):
        try:
            data = task_data(a, image_url=url_of(a["image_id"]), tree=tree, names=names)
        except KeyError as exc:
            problems.append(f"{a['image_id']}: unknown {exc.args[0]!r}")
            continue
        payload.append({"data": data, "overlap": int(a["overlap"])})
    if problems:
        raise CrowdError(f"{len(problems)} presence task(s) name an image or node the store lacks (first: "
                         f"{problems[:3]}); run ingest / vocab --det first; nothing was pushed")
    pushed = 0
    for kind, pid in projects.items():
        items = [p for p in payload if p["data"]["kind"] == kind]
        if not items:
            continue
        raise_overlap(client, pid, max(p["overlap"] for p in items))
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            ids = client.import_tasks(
                pid, batch,
                lambda pid=pid, kind=kind: {r: t["task_id"] for r, t in remote_tasks(client, {kind: pid}).items()},
                what=f"the import of {len(batch)} presence {kind} task(s)")
            if any(i is None for i in ids):
                raise CrowdError(f"Label Studio at {client.url} accepted the import of {kind} tasks but lists "
                                 f"{sum(i is None for i in ids)} of them nowhere; rerun `synsetforge det sync`")
            rows = [_row_from_data(i, pid, b["data"], gold) for i, b in zip(ids, batch, strict=True)]
            tasks = _append(store, "presence_tasks", tasks, pd.DataFrame(rows, columns=TASK_COLUMNS), ["request_id"])
            pushed += len(rows)
    return pushed


# ------------------------------------------------------------------------------------------------ pull
def parse_presence(kind: str, result: Any, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(node_id, yes|no) per node the task asked about; BadAnnotation for a result of another shape.

    >>> data = {"node_ids": ["n1", "n2", "n3"]}
    >>> parse_presence("checklist", [{"from_name": "item_1", "to_name": "image", "type": "choices",
    ...                               "value": {"choices": ["yes"]}}], data)
    [('n1', 'no'), ('n2', 'yes'), ('n3', 'no')]
    """
    nodes = [str(n) for n in data.get("node_ids") or []]
    if not nodes:
        raise BadAnnotation("task data has no node_ids")
    if kind == "question":
        return [(nodes[0], choices_answer(result, "answer", ("yes", "no")))]
    if not isinstance(result, list):
        raise BadAnnotation(f"result is {type(result).__name__}, expected a list")
    ticked: set[int] = set()
    for r in result:
        name = r.get("from_name") if isinstance(r, dict) else None
        if not isinstance(name, str) or not name.startswith("item_") or not name[5:].isdigit():
            raise BadAnnotation(f"unexpected control {name!r} in a checklist result (expected item_<index>)")
        idx = int(name[5:])
        if idx >= len(nodes):
            raise BadAnnotation(f"{name} points past the checklist's {len(nodes)} items")
        choices = (r.get("value") or {}).get("choices") if isinstance(r.get("value"), dict) else None
        if choices == []:
            continue  # ticked then unticked
        if choices != ["yes"]:
            raise BadAnnotation(f"{name} choices {choices!r}: expected ['yes']")
        ticked.add(idx)
    return [(n, "yes" if i in ticked else "no") for i, n in enumerate(nodes)]


def annotations_to_votes(export: list[dict[str, Any]], tasks: pd.DataFrame, seen: set[int],
                         worker_of: Mapping[int, str], key: bytes) -> tuple[pd.DataFrame, list[str]]:
    """Pure core of the pull: new presence_votes rows from a project export, and the problems of annotations of an
    unexpected shape (logged and skipped; a rerun skips them again)."""
    from crowd.pull import _ts, pseudonym

    by_task = {int(r["task_id"]): r for r in tasks.to_dict("records")} if len(tasks) else {}
    rows, problems = [], []
    for task in export:
        rec = by_task.get(int(task["id"]))
        if rec is None:
            continue  # not recorded yet: adopt runs first, so this is someone else's task
        for ann in task.get("annotations") or []:
            aid = ann.get("id")
            if aid is None or int(aid) in seen or ann.get("was_cancelled"):
                continue
            who = ann.get("completed_by")
            uid = who.get("id") if isinstance(who, dict) else who
            email = (who.get("email") if isinstance(who, dict) else None) or \
                (worker_of.get(int(uid), f"ls-user-{uid}") if uid is not None else "ls-user-unknown")
            try:
                answers = parse_presence(rec["kind"], ann.get("result"), {"node_ids": list(rec["node_ids"])})
            except BadAnnotation as exc:
                problems.append(f"annotation {aid} of task {task['id']}: {exc}")
                continue
            lead = ann.get("lead_time")
            for node, answer in answers:
                rows.append({"annotation_id": int(aid), "task_id": int(rec["task_id"]), "image_id": rec["image_id"],
                             "node_id": node, "worker": pseudonym(email, key), "answer": answer,
                             "is_gold": bool(rec["is_gold"]), "n_items": len(answers),
                             "lead_time_s": float(lead) if lead is not None else None,
                             "submitted_at": _ts(ann.get("created_at"))})
    return pd.DataFrame(rows, columns=VOTE_COLUMNS), problems


def pull_presence(store: Store, client: CrowdClient, settings: Any, projects: Mapping[str, int],
                  tasks: pd.DataFrame | None = None) -> int:
    """Append new annotations of the presence projects to presence_votes; a rerun adds nothing."""
    from crowd.pull import pseudonym_key, user_emails

    key = pseudonym_key(settings)
    tasks = tasks if tasks is not None else _read(store, "presence_tasks")
    votes = _read(store, "presence_votes")
    seen = set(votes["annotation_id"].astype("int64")) if len(votes) else set()
    worker_of = user_emails(client)
    new, problems = [], []
    for pid in projects.values():
        rows, bad = annotations_to_votes(client.export_json(pid), tasks, seen, worker_of, key)
        new.append(rows)
        problems += bad
    if problems:
        log.warning("%d presence annotation(s) of an unexpected shape skipped: %s", len(problems), problems[:3])
    new = [n for n in new if len(n)]
    if not new:
        return 0
    fresh = pd.concat(new, ignore_index=True)
    _append(store, "presence_votes", votes, fresh, ["annotation_id", "node_id"])
    return int(fresh["annotation_id"].nunique())


# ------------------------------------------------------------------------------------------------ sync
def admin_from_settings(settings: Any) -> CrowdClient:
    cs = settings.crowd
    if not cs.url or cs.token is None:
        raise CrowdError("crowd.url and crowd.token must be set (SYNSETFORGE__CROWD__URL / __TOKEN) for the "
                         "presence loop")
    return CrowdClient(cs.url, cs.token.get_secret_value(), retries=cs.retries)


def sync(store: Store, settings: Any, *, steps: int = 1, client: CrowdClient | None = None,
         pool: list[str] | None = None) -> dict[str, Any]:
    """adopt -> pull -> plan -> push, `steps` times; returns the last plan's summary and the counts."""
    client = client or admin_from_settings(settings)
    projects = provision_presence(client, settings, store)
    pulled = pushed = 0
    result = None
    for _ in range(steps):
        tasks, remote = adopt(store, client, projects)
        pulled += pull_presence(store, client, settings, projects, tasks)
        result = run_presence_plan(store, settings, pool)
        n = push_presence(store, client, settings, projects, result.actions, remote=remote)
        if n:  # replay once more so det_images shows the pushed tasks as waiting
            result = run_presence_plan(store, settings, pool)
        pushed += n
    assert result is not None
    return {"projects": projects, "pulled": pulled, "pushed": pushed, "open_actions": len(result.actions),
            **summarize(result.images, result.labels)}


# -------------------------------------------------------------------------------------------- DET boxes
def det_box_pairs(store: Store) -> pd.DataFrame:
    """(image_id, wnid, width, height, storage_key): every present class of every fully annotated image."""
    images = store.read_table("det_images", missing_ok=True).to_pandas()
    cols = ["image_id", "wnid", "width", "height", "storage_key"]
    if not len(images):
        return pd.DataFrame(columns=cols)
    done = images[images["state"] == "done"]
    pairs = pd.DataFrame([(r.image_id, w) for r in done.itertuples(index=False) for w in r.present],
                         columns=["image_id", "wnid"])
    facts = store.read_table("images", columns=["image_id", "width", "height", "storage_key", "status"]).to_pandas()
    facts = facts[(facts["status"] == "accepted") & facts["image_id"].notna()].drop_duplicates("image_id")
    out = pairs.merge(facts[["image_id", "width", "height", "storage_key"]], on="image_id", how="inner")
    return out.sort_values(["wnid", "image_id"]).reset_index(drop=True)[cols]


def det_tables(settings: Any) -> Any:
    from pipeline.boxes import det_box_tables

    return det_box_tables(det_settings(settings).box_kind)


def sync_det_boxes(store: Store, settings: Any, *, steps: int = 1, client: CrowdClient | None = None
                   ) -> dict[str, Any]:
    """One step of the box loop over every present class of the fully annotated images (DET tables/projects)."""
    from crowd.boxes import sync as box_sync
    from pipeline.boxes import box_settings

    return box_sync(store, settings, steps=steps, client=client or admin_from_settings(settings),
                    pairs=det_box_pairs(store), policy=box_settings(settings), tables=det_tables(settings))


# ------------------------------------------------------------------------------------- simulated workers
def render_answer(kind: str, answers: list[str]) -> list[dict[str, Any]]:
    """The Label Studio result a person's clicks produce for these answers (one per item)."""
    if kind == "question":
        return [{"from_name": "answer", "to_name": "image", "type": "choices", "value": {"choices": [answers[0]]}}]
    return [{"from_name": f"item_{i}", "to_name": "image", "type": "choices", "value": {"choices": ["yes"]}}
            for i, a in enumerate(answers) if a == "yes"]


def work_presence(annotators: list[Any], projects: Mapping[str, int], truth: Mapping[str, set[str]], *,
                  seed: int = 0, seconds: Mapping[str, float] | None = None) -> dict[str, int]:
    """Simulated annotators (crowd.simulate.Annotator with a Profile) take presence tasks from the next-task
    endpoints until none is left; `truth`: image_id -> the nodes present (classes and their ancestors). A task about
    nodes the annotator already judged in that image is skipped, as a person who recognises it would."""
    from crowd.simulate import Blocked, next_task, skip, submit

    seconds = seconds or {"question": 2.0, "checklist": 4.0}
    done = {a.email: 0 for a in annotators}
    judged: dict[str, set[tuple[str, str]]] = {a.email: set() for a in annotators}
    active = list(annotators)
    while active:
        still = []
        for a in active:
            did = False
            for kind, pid in projects.items():
                try:
                    task = next_task(a.client, pid)
                except Blocked:
                    continue
                if task is None:
                    continue
                data = task["data"]
                nodes = [str(n) for n in data["node_ids"]]
                if any((data["image_id"], n) in judged[a.email] for n in nodes):
                    skip(a.client, int(task["id"]), pid)
                    did = True
                    break
                rng = random.Random(int(hashlib.sha256(f"{seed}|{a.email}|{task['id']}".encode()).hexdigest()[:12], 16))
                present = truth.get(data["image_id"], set())
                answers = [a.profile.answer("yes" if n in present else "no", rng=rng) for n in nodes]
                submit(a.client, int(task["id"]), pid, render_answer(kind, answers), seconds.get(kind, 2.0))
                judged[a.email].update((data["image_id"], n) for n in nodes)
                done[a.email] += 1
                did = True
                break  # one task per turn, as people working side by side
            if did:
                still.append(a)
        random.Random(seed).shuffle(still)
        active = still
    return done


def run_until_done(store: Store, settings: Any, annotators: list[Any], truth: Mapping[str, set[str]], *,
                   client: CrowdClient, seed: int = 0, max_rounds: int = 40) -> dict[str, Any]:
    """sync -> simulated work -> sync ... until the loop has nothing left to ask (the real-server evidence run)."""
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    annotations = 0
    for rounds in range(1, max_rounds + 1):
        summary = sync(store, settings, client=client)
        if summary["pushed"] == 0 and summary["open_actions"] == 0 and summary["by_state"].get("waiting", 0) == 0:
            break
        annotations += sum(work_presence(annotators, summary["projects"], truth, seed=seed + rounds).values())
    else:
        raise CrowdError(f"presence loop not finished after {max_rounds} rounds")
    return {**summary, "rounds": rounds, "annotations": annotations, "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------------- CLI
def _cmd_sync(args: Any, settings: Any) -> int:
    import json

    from pipeline.store import store_from_settings

    out = sync(store_from_settings(settings), settings, steps=args.steps)
    print(json.dumps({k: v for k, v in out.items() if k != "projects"}, indent=2, default=str))
    return 0


def _cmd_boxes(args: Any, settings: Any) -> int:
    import json

    from pipeline.store import store_from_settings

    out = sync_det_boxes(store_from_settings(settings), settings, steps=args.steps)
    print(json.dumps({k: v for k, v in out.items() if k != "projects"}, indent=2, default=str))
    return 0


def register_cli(subparsers: Any) -> None:
    """`det sync` and `det boxes` (they need Label Studio) onto the stage's `det` parser."""
    det = subparsers.choices.get("det")
    if det is None:
        return
    p = det.subcommands.add_parser("sync", help="one presence step against Label Studio: adopt, pull answers, "
                                   "replay (QC), push the next questions")
    p.add_argument("--steps", type=int, default=1)
    p.set_defaults(func=_cmd_sync)
    p = det.subcommands.add_parser("boxes", help="one step of the box loop over every present class of the fully "
                                   "annotated images (det.box_kind: extreme clicks or drawing)")
    p.add_argument("--steps", type=int, default=1)
    p.set_defaults(func=_cmd_boxes)
