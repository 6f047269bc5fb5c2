"""Crowd status and worker control: per synset how many tasks are open or done; per worker the votes, gold record,
QC's view and whether the account is blocked; blocking and unblocking accounts.

Blocking deactivates the Label Studio account (`CrowdClient.block_user`): the person can no longer log in and the
account's token stops working, so it gets no task; its annotations stay on the server, are still pulled and QC still
weighs (or drops) them. Who to block comes from the two worker tables: `worker_gold` (gold accuracy, measured by
pull) and `workers` (QC's model: spammers, yes-sayers, adversaries, low estimated accuracy). Pseudonyms are mapped
back to accounts only here, with the admin token and the pseudonym key (`crowd.pull.accounts`), never in a table.

    >>> import pandas as pd
    >>> tasks = pd.DataFrame({"task_id": [1, 2], "wnid": ["n1", "n1"], "is_gold": [False, True]})
    >>> remote = pd.DataFrame({"task_id": [1, 2], "is_labeled": [True, False]})
    >>> votes = pd.DataFrame({"task_id": [1], "wnid": ["n1"], "worker": ["w-a"]})
    >>> synset_status(tasks, remote, votes).to_dict("records")
    [{'wnid': 'n1', 'tasks': 2, 'gold_tasks': 1, 'open': 1, 'done': 1, 'votes': 1, 'workers': 1}]
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from crowd.client import CrowdClient, CrowdError, ProtectedAccount
from pipeline.errors import UserError
from pipeline.store import Store

log = logging.getLogger("synsetforge.crowd")

RECORD_COLUMNS = ["worker", "user_id", "n_votes", "n_repeats", "gold_n", "gold_accuracy", "estimated_accuracy",
                  "qc_flag", "gold_flag", "flagged", "blocked"]


class WorkerUnknown(UserError):
    """No Label Studio account has the given pseudonym or email."""


def synset_status(tasks: pd.DataFrame, remote: pd.DataFrame, votes: pd.DataFrame) -> pd.DataFrame:
    """Pure: one row per wnid. `remote`: task_id, is_labeled (done: the task has all its annotations)."""
    if tasks.empty:
        return pd.DataFrame(columns=["wnid", "tasks", "gold_tasks", "open", "done", "votes", "workers"])
    t = tasks.merge(remote[["task_id", "is_labeled"]], on="task_id", how="left")
    t["done"] = t["is_labeled"].fillna(False).astype(bool)
    out = t.groupby("wnid").agg(tasks=("task_id", "size"), gold_tasks=("is_gold", "sum"), done=("done", "sum"))
    out["open"] = out["tasks"] - out["done"]
    if len(votes):
        vg = votes.groupby("wnid").agg(votes=("task_id", "size"), workers=("worker", "nunique"))
        out = out.join(vg, how="left")
    else:
        out["votes"], out["workers"] = 0, 0
    out = out.fillna(0).astype("int64").reset_index()
    return out[["wnid", "tasks", "gold_tasks", "open", "done", "votes", "workers"]]


def status(store: Store, client: CrowdClient | None, project_ids: list[int], settings: Any = None) -> dict[str, Any]:
    """Per synset tasks and votes; per worker the votes QC counts, the repeats it ignores, gold record and flags
    (`worker_records`, counted as `pipeline.qc.team.vote_accounting` counts: the same numbers as QC's `workers` table
    and the release report); with `settings`, the team's situation in words (`team`: see `pipeline.qc.team`)."""
    from crowd.provision import read_projects, sync_projects
    from crowd.pull import latest_votes
    from pipeline.qc.team import team_status, vote_accounting

    tasks = store.read_table("tasks", missing_ok=True).to_pandas()
    votes = latest_votes(store.read_table("votes", missing_ok=True).to_pandas())
    remote = task_done(store, tasks)
    worker_gold = store.read_table("worker_gold", missing_ok=True).to_pandas()
    qc_workers = store.read_table("workers", missing_ok=True).to_pandas()
    quarantine = store.read_table("quarantine", missing_ok=True).to_pandas()
    gold = store.read_table("gold", missing_ok=True).to_pandas()
    counts = vote_accounting(votes)
    records = worker_records(worker_gold, qc_workers, counts=counts).drop(columns=["user_id", "blocked"])
    out = {"synsets": synset_status(tasks, remote, votes), "workers": records, "quarantined": len(quarantine),
           "gold": len(gold), "votes_pulled": int(counts["n_pulled"].sum()), "votes_counted": int(counts["n_votes"].sum()),
           "repeats": int(counts["n_repeats"].sum()), "team": None,
           "projects": sync_projects(client, store, settings) if client is not None and settings is not None
           else read_projects(store)}
    if settings is not None:
        labels = store.read_table("labels", missing_ok=True).to_pandas()
        plan = store.read_table("push_plan", missing_ok=True).to_pandas()
        out["team"] = team_status(votes, qc_workers, labels, plan, settings.qc)
    return out


def task_done(store: Store, tasks: pd.DataFrame) -> pd.DataFrame:
    """task_id, is_labeled (done) of the `tasks` rows, as of the last pull: done once the annotations pulled for a
    task reach the overlap its request asked for (from the store alone: no task listing on the server)."""
    from crowd.push import task_progress

    if tasks.empty or not store.has_table("push_requests"):
        return pd.DataFrame({"task_id": pd.Series(dtype="int64"), "is_labeled": pd.Series(dtype=bool)})
    reqs = store.read_table("push_requests", columns=["request_id", "overlap"]).to_pandas()
    t = tasks[["task_id", "request_id"]].merge(reqs, on="request_id", how="left")
    want = t.groupby("task_id")["overlap"].max()
    have = task_progress(store, tasks).reindex(want.index, fill_value=0)
    return pd.DataFrame({"task_id": want.index.astype("int64"), "is_labeled": (have >= want.fillna(1)).to_numpy()})


# -- workers --------------------------------------------------------------------------------------------
def flag_reasons(store: Store) -> dict[str, str]:
    """Pseudonym -> why it must get no more tasks: flagged by gold accuracy (`worker_gold`, measured by pull) or by
    QC's worker model (`workers`: spammers, yes-sayers, adversaries, low estimated accuracy)."""
    out: dict[str, str] = {}
    for name, label in (("worker_gold", "gold"), ("workers", "qc")):
        if store.has_table(name):
            t = store.read_table(name).to_pandas()
            t = t[t["flagged"].astype(bool)]
            for w, r in zip(t["worker"], t["flag_reason"], strict=True):
                out.setdefault(str(w), f"{label}: {r}" if r else label)
    return out


def flagged_workers(store: Store) -> set[str]:
    """Pseudonyms flagged in `worker_gold` or `workers` (see flag_reasons)."""
    return set(flag_reasons(store))


def worker_records(worker_gold: pd.DataFrame, workers: pd.DataFrame, accounts: pd.DataFrame | None = None,
                   blocked_ids: set[int] | None = None, counts: pd.DataFrame | None = None) -> pd.DataFrame:
    """Pure: one row per worker (from either table, plus blocked accounts with no record): votes, gold answers and
    accuracy, QC's estimated accuracy, each side's flag, and (given the accounts and the blocked ids) the account id
    and whether it is blocked (None: not known). `counts` (`pipeline.qc.team.vote_accounting` of the votes) gives
    n_votes as QC counts them (one per worker and pair) and n_repeats (the pulled votes QC ignores); without it
    n_votes comes from the tables and n_repeats is None.

        >>> wg = pd.DataFrame({"worker": ["w-a", "w-b"], "n_votes": [10, 12], "gold_n": [4, 6],
        ...                    "gold_accuracy": [1.0, 0.5], "flagged": [False, True], "flag_reason": [None, "gold 0.5"]})
        >>> qc = pd.DataFrame({"worker": ["w-a"], "n_votes": [10], "estimated_accuracy": [0.97], "flagged": [False],
        ...                    "flag_reason": [None]})
        >>> acc = pd.DataFrame({"worker": ["w-a", "w-b"], "user_id": [3, 4], "email": ["a@x", "b@x"]})
        >>> worker_records(wg, qc, acc, {4})[["worker", "user_id", "gold_flag", "flagged", "blocked"]].values.tolist()
        [['w-a', 3, None, False, False], ['w-b', 4, 'gold 0.5', True, True]]
    """
    g = worker_gold.set_index("worker") if len(worker_gold) else pd.DataFrame()
    q = workers.set_index("worker") if len(workers) else pd.DataFrame()
    c = counts.set_index("worker") if counts is not None and len(counts) else None
    names = set(g.index) | set(q.index) | (set(c.index) if c is not None else set())
    acc = accounts if accounts is not None else pd.DataFrame(columns=["worker", "user_id", "email"])
    uid = dict(zip(acc["worker"], acc["user_id"], strict=True))
    if blocked_ids:
        names |= {w for w, u in uid.items() if u in blocked_ids}
    rows = []
    for w in sorted(names):
        gr = g.loc[w] if w in g.index else None
        qr = q.loc[w] if w in q.index else None
        g_flag = gr is not None and bool(gr["flagged"])
        q_flag = qr is not None and bool(qr["flagged"])
        n_votes = gr["n_votes"] if gr is not None else (qr["n_votes"] if qr is not None else 0)
        n_repeats = None
        if counts is not None:
            n_votes, n_repeats = (int(c.loc[w, "n_votes"]), int(c.loc[w, "n_repeats"])) if c is not None and w in c.index \
                else (0, 0)
        gold_n = gr["gold_n"] if gr is not None else (qr["gold_n"] if qr is not None and "gold_n" in qr else 0)
        user = uid.get(w)
        rows.append({
            "worker": w, "user_id": None if user is None else int(user), "n_votes": int(n_votes), "n_repeats": n_repeats,
            "gold_n": int(gold_n),
            "gold_accuracy": gr["gold_accuracy"] if gr is not None else None,
            "estimated_accuracy": qr["estimated_accuracy"] if qr is not None else None,
            "qc_flag": (qr["flag_reason"] or "flagged") if q_flag else None,
            "gold_flag": (gr["flag_reason"] or "flagged") if g_flag else None,
            "flagged": g_flag or q_flag,
            "blocked": None if blocked_ids is None or user is None else int(user) in blocked_ids,
        })
    out = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    out["user_id"] = out["user_id"].astype("Int64")
    out["n_repeats"] = out["n_repeats"].astype("Int64")
    for col in ("qc_flag", "gold_flag", "blocked", "gold_accuracy", "estimated_accuracy"):
        out[col] = out[col].astype(object).where(out[col].notna(), None)
    return out


def _password(settings: Any) -> str:
    secret = settings.crowd.admin_password
    if secret is None or not secret.get_secret_value():
        raise UserError("crowd.admin_password is not set: export SYNSETFORGE__CROWD__ADMIN_PASSWORD (the password of the "
                        "Label Studio account whose token synsetforge uses; `synsetforge crowd serve` writes it to "
                        "<data dir>/admin-password). Blocking goes through Label Studio's /admin/ site, which needs it")
    return secret.get_secret_value()


def workers_report(store: Store, client: CrowdClient | None, settings: Any) -> pd.DataFrame:
    """worker_records for the store, with accounts and blocked state when a client (and admin password) is at hand;
    plus an `email` column, for the admin's eyes only (never written anywhere)."""
    from crowd.pull import accounts, pseudonym_key
    from pipeline.qc.team import vote_accounting

    wg = store.read_table("worker_gold", missing_ok=True).to_pandas()
    qc = store.read_table("workers", missing_ok=True).to_pandas()
    counts = vote_accounting(store.read_table("votes", missing_ok=True).to_pandas())
    acc = blocked = None
    if client is not None:
        acc = accounts(client, pseudonym_key(settings))
        if settings.crowd.admin_password is not None:
            blocked = client.blocked_user_ids(password=_password(settings))
    out = worker_records(wg, qc, acc, blocked, counts=counts)
    email = dict(zip(acc["worker"], acc["email"], strict=True)) if acc is not None else {}
    return out.assign(email=[email.get(w) for w in out["worker"]])


def resolve_account(client: CrowdClient, settings: Any, who: str) -> tuple[str, int]:
    """(pseudonym, user id) of a worker given by pseudonym or email."""
    from crowd.pull import accounts, pseudonym, pseudonym_key

    key = pseudonym_key(settings)
    acc = accounts(client, key)
    w = who.strip()
    worker = w if w.startswith("w-") else pseudonym(w, key)
    hit = acc[acc["worker"] == worker]
    if hit.empty:
        raise WorkerUnknown(f"no Label Studio account at {client.url} has pseudonym {worker}"
                            f"{'' if w.startswith('w-') else f' (the pseudonym of {w})'} under this crowd.pseudonym_key; "
                            "`synsetforge crowd workers` lists the workers")
    return worker, int(hit["user_id"].iloc[0])


def set_blocked(client: CrowdClient, settings: Any, who: str, blocked: bool) -> dict[str, Any]:
    """Block or unblock one worker (pseudonym or email); returns what happened."""
    worker, uid = resolve_account(client, settings, who)
    password = _password(settings)
    changed = client.block_user(uid, password=password) if blocked else client.unblock_user(uid, password=password)
    return {"worker": worker, "user_id": uid, "blocked": blocked, "changed": changed}


def block_flagged(store: Store, client: CrowdClient, settings: Any) -> dict[str, Any]:
    """Block every account QC or gold flags, except `crowd.block_exempt`; never unblocks anyone. Returns the
    pseudonyms newly blocked, the ones already blocked and flagged pseudonyms with no account on this server."""
    from crowd.pull import accounts, pseudonym_key

    reasons = flag_reasons(store)
    exempt = set(settings.crowd.block_exempt)
    todo = {w: r for w, r in reasons.items() if w not in exempt}
    if not todo:
        return {"flagged": len(reasons), "blocked": [], "already_blocked": 0, "no_account": [], "exempt": len(reasons)}
    password = _password(settings)
    acc = accounts(client, pseudonym_key(settings))
    uid = dict(zip(acc["worker"], acc["user_id"], strict=True))
    already = client.blocked_user_ids(password=password)
    me = int(client.whoami().get("id", -1))
    newly, missing, n_already = [], [], 0
    for w in sorted(todo):
        if w not in uid:
            missing.append(w)
            continue
        if uid[w] in already:
            n_already += 1
            continue
        if uid[w] == me:
            log.warning("worker %s is flagged (%s) but is the admin account: not blocked", w, todo[w])
            continue
        try:
            client.block_user(uid[w], password=password)
        except ProtectedAccount:
            log.warning("worker %s is flagged (%s) but is an administrator: not blocked", w, todo[w])
            continue
        log.info("blocked worker %s (%s)", w, todo[w])
        newly.append(w)
    return {"flagged": len(reasons), "blocked": newly, "already_blocked": n_already, "no_account": missing,
            "exempt": len(reasons) - len(todo)}


# -- accounts: the invite link and named annotator accounts -----------------------------------------------------
def find_user(admin: CrowdClient, email: str) -> int | None:
    """The user id of the organization member with this email, or None."""
    for u in admin.list_users():
        if (u.get("email") or "").lower() == email.strip().lower():
            return int(u["id"])
    return None


def invite_link(admin: CrowdClient, base_url: str | None = None, *, reset: bool = False) -> str:
    """The organization's sign-up link (Label Studio's /api/invite); `reset` makes a new one (the old stops working).
    `base_url`: the address annotators' browsers use (crowd.public_url), default the client's."""
    if reset:
        body = admin.request_json("POST", "/api/invite/reset-token", "make a new invite link")
    else:
        body = admin.get_json("/api/invite")
    path = body.get("invite_url") or f"/user/signup/?token={body['token']}"
    return (base_url or admin.url).rstrip("/") + path


def form_post(s: Any, path: str, data: dict[str, str]) -> Any:
    """POST a Django form on an httpx session, with the CSRF token its GET set (as a browser sends it)."""
    s.get(path)
    csrf = s.cookies.get("csrftoken") or ""
    return s.post(path, data={**data, "csrfmiddlewaretoken": csrf}, headers={"X-CSRFToken": csrf})


def create_account(admin: CrowdClient, email: str, password: str, *, rotate_invite: bool = False) -> tuple[int, bool]:
    """(user id, created) of an annotator account with this email, made through the organization's invite link as a
    person invited by the admin would sign up (Label Studio's user API cannot set a password). An existing account is
    left as it is (created False: its password is not changed). `rotate_invite` makes a new invite link afterwards:
    the server's access log records the sign-up URL with its token."""
    import httpx

    uid = find_user(admin, email)
    if uid is not None:
        return uid, False
    invite = admin.get_json("/api/invite")
    httpx_log = logging.getLogger("httpx")
    level = httpx_log.level
    httpx_log.setLevel(logging.WARNING)  # its INFO line would carry the invite token in the URL
    try:
        with httpx.Client(base_url=admin.url, follow_redirects=True, timeout=60) as s:
            resp = form_post(s, f"/user/signup/?token={invite['token']}", {"email": email, "password": password})
            signed_up = "sessionid" in s.cookies
    finally:
        httpx_log.setLevel(level)
        if rotate_invite:
            admin.request("POST", "/api/invite/reset-token", "rotate the invite token")
    if not signed_up:
        raise CrowdError(f"sign-up of {email} at {admin.url} failed (HTTP {resp.status_code}); is the email valid and the "
                         "password long enough (8+ characters, not too common)?")
    uid = find_user(admin, email)
    if uid is None:
        raise CrowdError(f"{email} signed up but is not a member of the admin's organization")
    return uid, True
