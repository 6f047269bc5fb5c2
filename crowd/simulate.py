"""Simulated annotators: real accounts on the real server, each working the way a person does.

Each annotator logs in with its own account, asks the project's next-task endpoint for work, answers from
a truth table through its profile, and submits the annotation as itself (with a lead time). Profiles:
accuracy (optionally per difficulty), a bias towards yes, spammers (random answers), adversarial workers
(always wrong) and speed. Answers are seeded per (annotator, task), so a run is reproducible.

    >>> p = Profile(accuracy=1.0)
    >>> p.answer("yes", rng=__import__("random").Random(0))
    'yes'
    >>> Profile(kind="adversarial").answer("yes", rng=__import__("random").Random(0))
    'no'
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from crowd.client import CrowdClient, CrowdError
from crowd.kinds import KINDS
from crowd.status import (
    flagged_workers,  # noqa: F401 - routing helpers live here too
    form_post,
)

log = logging.getLogger("synsetforge.crowd")


@dataclass(frozen=True)
class Profile:
    """How a simulated worker answers. kind: honest | spammer | adversarial."""

    accuracy: float = 0.9
    yes_bias: float = 0.0  # probability of answering yes whatever the truth
    kind: str = "honest"
    speed_s: float = 4.0  # mean seconds per task, reported as lead_time
    accuracy_by_difficulty: Mapping[str, float] = field(default_factory=dict)

    def answer(self, truth: str, *, rng: random.Random, difficulty: str | None = None,
               choices: tuple[str, ...] = ("yes", "no")) -> str:
        if self.kind == "spammer":
            return rng.choice(choices)
        wrong = [c for c in choices if c != truth]
        if self.kind == "adversarial":
            return wrong[0] if wrong else truth
        if self.yes_bias and rng.random() < self.yes_bias:
            return "yes"
        acc = self.accuracy_by_difficulty.get(difficulty, self.accuracy) if difficulty else self.accuracy
        return truth if rng.random() < acc else rng.choice(wrong)


@dataclass
class Annotator:
    email: str
    password: str = field(repr=False)
    profile: Profile
    user_id: int = 0
    client: CrowdClient | None = field(default=None, repr=False)
    judged: set[tuple[str, str]] = field(default_factory=set, repr=False)  # (image_id, wnid) pairs answered


def find_user(admin: CrowdClient, email: str) -> int | None:
    from crowd.status import find_user as find

    return find(admin, email)


def ensure_user(admin: CrowdClient, email: str, password: str) -> int:
    """The account's user id; a new account signs up through the organization's invite link, as a person
    invited by the admin would (`crowd.status.create_account`), and the link is renewed afterwards. Idempotent by
    email."""
    from crowd.status import create_account

    return create_account(admin, email, password, rotate_invite=True)[0]


def login_token(url: str, email: str, password: str) -> str:
    """Log in through the web form as that person would and read the account's API token."""
    with httpx.Client(base_url=url, follow_redirects=True, timeout=60) as s:
        resp = form_post(s, "/user/login/", {"email": email, "password": password})
        if "sessionid" not in s.cookies:
            raise CrowdError(f"login of {email} at {url} failed (HTTP {resp.status_code}); check the password")
        tok = s.get("/api/current-user/token")
        tok.raise_for_status()
        return tok.json()["token"]


def make_annotators(admin: CrowdClient, profiles: list[Profile], *, prefix: str = "sim",
                    domain: str = "synsetforge.local", password: str | None = None) -> list[Annotator]:
    """One account per profile (sim-00@..., sim-01@...), logged in, with its own client."""
    password = password or secrets.token_urlsafe(12)
    out = []
    for i, prof in enumerate(profiles):
        email = f"{prefix}-{i:02d}@{domain}"
        uid = ensure_user(admin, email, password)
        token = login_token(admin.url, email, password)
        out.append(Annotator(email, password, prof, uid, CrowdClient(admin.url, token, retries=admin.retries)))
    return out


def routable(annotators: list[Annotator], flagged: set[str], key: bytes) -> list[Annotator]:
    """Annotators whose pseudonym is not in `flagged` (see flagged_workers)."""
    from crowd.pull import pseudonym

    return [a for a in annotators if pseudonym(a.email, key) not in flagged]


def controls_of(store: Any) -> dict[tuple[str, str], str]:
    """(image_id, wnid) -> answer of every control in the store's `gold` table (for `work`)."""
    gold = store.read_table("gold", missing_ok=True).to_pandas()
    return {(i, w): str(a) for i, w, a in zip(gold["image_id"], gold["wnid"], gold["answer"], strict=True)}


class Blocked(CrowdError):
    """The server refuses this account (deactivated: its token no longer works): it gets no task."""


def next_task(client: CrowdClient, project_id: int) -> dict[str, Any] | None:
    """The project's next task for this account, or None when it has nothing left to do. Raises `Blocked` when the
    server refuses the account (401/403: deactivated, or out of the organization)."""
    resp = client._http.get(f"/api/projects/{project_id}/next")
    if resp.status_code == 404:
        return None
    if resp.status_code in (401, 403):
        raise Blocked(f"Label Studio refuses this account the next task of project {project_id} "
                      f"(HTTP {resp.status_code}): it is blocked", status=resp.status_code, transient=False)
    resp.raise_for_status()
    body = resp.json()
    return body if body and body.get("id") else None


def submit(client: CrowdClient, task_id: int, project_id: int, result: list[dict[str, Any]], lead_time_s: float) -> int:
    resp = client.request("POST", f"/api/tasks/{task_id}/annotations/", f"submit annotation to task {task_id}",
                          json={"result": result, "lead_time": lead_time_s, "project": project_id})
    return int(resp.json()["id"])


def skip(client: CrowdClient, task_id: int, project_id: int) -> int:
    """Label Studio's Skip button: a cancelled annotation; the task is not offered to this account again."""
    resp = client.request("POST", f"/api/tasks/{task_id}/annotations/", f"skip task {task_id}",
                          json={"result": [], "was_cancelled": True, "project": project_id})
    return int(resp.json()["id"])


def work(
    annotators: list[Annotator],
    project_id: int,
    truth: Mapping[tuple[str, str], str],
    *,
    seed: int = 0,
    max_tasks_per_worker: int | None = None,
    difficulty: Mapping[str, str] | None = None,
    controls: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, int]:
    """Annotators take turns (one task each per round, as people working side by side) until none has work.

    truth: (image_id, wnid) -> answer. difficulty: wnid -> difficulty class for accuracy_by_difficulty.
    Returns annotations per email. Real blocking is `crowd.status.block_flagged`; a simulation without it can route
    away from flagged workers itself (see `routable`).
    A verification task for a pair the annotator already judged is skipped, as a person who recognises the image
    would: QC counts one vote per worker and pair, so a second answer would only waste the task. `controls`
    ((image_id, wnid) -> answer: the gold table, see `controls_of`) are answered again instead, since a person
    cannot tell a control from another task, and their answer is the truth for pairs `truth` does not hold.
    An annotator whose account is blocked (the server refuses its next-task call) stops working.
    """
    controls = controls or {}
    done = {a.email: 0 for a in annotators}
    active = list(annotators)
    while active:
        still = []
        for a in active:
            if max_tasks_per_worker is not None and done[a.email] >= max_tasks_per_worker:
                continue
            try:
                task = next_task(a.client, project_id)
            except Blocked:
                log.info("%s is blocked: no more tasks", a.email)
                continue
            if task is None:
                continue
            data = task["data"]
            kind = KINDS[data.get("kind", "verify")]
            rng = random.Random(int(hashlib.sha256(f"{seed}|{a.email}|{task['id']}".encode()).hexdigest()[:12], 16))
            # A grid task asks about many images: the worker judges each one, then submits once.
            image_ids = [i for _, i in kind.items(data)] if kind.items is not None else [data["image_id"]]
            pair = (data.get("image_id"), data["wnid"])
            if kind.items is None and pair in a.judged and pair not in controls:
                skip(a.client, int(task["id"]), project_id)
                still.append(a)
                continue
            answers = {}
            for image_id in image_ids:
                key = (image_id, data["wnid"])
                known = truth[key] if key in truth else controls.get(key)
                if known is None:
                    raise KeyError(f"no truth for {key}: the simulation's truth table must cover every pushed task")
                answers[image_id] = a.profile.answer(known, rng=rng, choices=kind.answers,
                                                     difficulty=(difficulty or {}).get(data["wnid"]))
            lead = max(0.5, rng.gauss(a.profile.speed_s, a.profile.speed_s / 4))
            result = kind.render(answers, data) if kind.items is not None else kind.render(answers[image_ids[0]], data)
            submit(a.client, int(task["id"]), project_id, result, round(lead, 3))
            a.judged.update((i, data["wnid"]) for i in image_ids)
            done[a.email] += 1
            still.append(a)
        active = still
    return done
