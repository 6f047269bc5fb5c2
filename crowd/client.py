"""A thin wrapper around label-studio-sdk 2.x: retries with backoff, clear errors, no secret in any message.

Typed SDK calls go through `call(what, fn, ...)`; the few endpoints where the SDK's models would cost a
parse per task (task listing, JSON export, the annotator's next-task call) go through `request`, which
uses the same retry policy. Every failure that survives the retries becomes a `CrowdError` naming the
server URL and the operation, never the token.

    >>> c = CrowdClient("http://127.0.0.1:8080", "secret-token", retries=0)
    >>> "secret-token" in repr(c)
    False
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from html.parser import HTMLParser
from typing import Any, TypeVar

import httpx

from pipeline.errors import RETRY_STATUS, ServiceError

log = logging.getLogger("synsetforge.crowd")
T = TypeVar("T")


EXPORT_CHUNK = 500  # task ids per export call: Django refuses more than 1,000 query parameters
# Data Manager columns it computes per task with subqueries; a listing that hides them is about 3x cheaper
DM_COMPUTED = [f"tasks:{c}" for c in (
    "completed_at", "annotations_results", "predictions_results", "predictions_score", "annotators",
    "annotations_ids", "predictions_model_versions", "avg_lead_time", "draft_exists", "updated_by", "file_upload",
    "storage_filename", "comment_count", "unresolved_comment_count", "last_comment_updated_at", "comment_authors",
    "reviewed", "reviewers", "agreement")]
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the Data Manager's filter format (UTC)


def task_filter(column: str, operator: str, value: Any, kind: str) -> dict[str, Any]:
    """One Data Manager filter item: column (`updated_at`, `id`, `is_labeled`, `data.request_id`, ...), operator
    (`greater`, `less`, `equal`, `in_list`, ...), value, kind (`Datetime`, `Number`, `Boolean`, `String`). A
    datetime value is written in the Data Manager's format, in UTC.

        >>> from datetime import datetime, UTC
        >>> task_filter("updated_at", "greater", datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "Datetime")["value"]
        '2026-01-02T03:04:05.000006Z'
    """
    if hasattr(value, "astimezone"):
        from datetime import UTC

        value = value.astimezone(UTC).strftime(DATETIME_FORMAT)
    return {"filter": f"filter:tasks:{column}", "operator": operator, "type": kind, "value": value}


class CrowdError(ServiceError):
    """Label Studio could not be reached, refused a request or answered something malformed; the message says
    what to do. `status` is the HTTP status of the last answer (None: no answer or an unreadable one)."""


class ProtectedAccount(CrowdError):
    """The account is an administrator (staff or superuser) or the token's own: the client never deactivates it."""


class MalformedAnswer(ValueError):
    """A 2xx answer whose body is not what the endpoint returns (truncated JSON, wrong shape): retried."""


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an SDK or httpx error carries, if any."""
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, CrowdError):
        return exc.status
    if isinstance(exc, ApiError):
        return exc.status_code
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    return None


def _is_transient(exc: BaseException) -> bool:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, (httpx.TransportError, MalformedAnswer, json.JSONDecodeError)):
        return True  # a reply cut off mid-body decodes as malformed JSON: the next try usually reads it whole
    if isinstance(exc, (ApiError, httpx.HTTPStatusError)):
        status = status_of(exc)
        return status is None or status in RETRY_STATUS or status >= 500
    return False


class CrowdClient:
    """One Label Studio account (admin or annotator) on one server."""

    def __init__(
        self, url: str, token: str, *, retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not url:
            raise CrowdError("no Label Studio URL: set SYNSETFORGE__CROWD__URL or pass --url")
        if not token:
            raise CrowdError("no Label Studio token: set SYNSETFORGE__CROWD__TOKEN (an API token of an admin)")
        self.url = url.rstrip("/")
        self._token = token
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout_s, headers={"Authorization": f"Token {token}"}, follow_redirects=True,
        )
        self._sdk: Any = None

    def __repr__(self) -> str:
        return f"CrowdClient({self.url!r})"

    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            from label_studio_sdk import LabelStudio

            # The SDK retries twice on its own; we keep it at 0 so one policy (ours) applies.
            self._sdk = LabelStudio(base_url=self.url, api_key=self._token, timeout=self.timeout_s, max_retries=0)
        return self._sdk

    def close(self) -> None:
        self._http.close()

    # -- retry policy -----------------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an SDK call; retry transient failures (connection refused, 5xx, 429) with exponential backoff."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified just below
                status = status_of(exc)
                if not _is_transient(exc):
                    raise CrowdError(f"Label Studio at {self.url} refused {what}: {_describe(exc, self._token)}",
                                     status=status, transient=False) from None
                if attempt == self.retries:
                    raise CrowdError(
                        f"Label Studio at {self.url} did not answer {what} after {self.retries + 1} tries "
                        f"({_describe(exc, self._token)}); check the server is running (`synsetforge crowd serve`) "
                        "and rerun: completed work is kept and nothing is pushed or pulled twice",
                        status=status, transient=True,
                    ) from None
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, type(exc).__name__, attempt + 1,
                            self.retries, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> httpx.Response:
        """A raw API request under the same retry policy; raises CrowdError on a non-2xx answer."""

        def go() -> httpx.Response:
            resp = self._http.request(method, path, **kwargs)
            resp.raise_for_status()
            return resp

        return self.call(what or f"{method} {path}", go)

    def request_json(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> Any:
        """`request` and decode the JSON body inside the same retries: a truncated answer is tried again."""

        def go() -> Any:
            resp = self._http.request(method, path, **kwargs)
            resp.raise_for_status()
            try:
                return resp.json()
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                raise MalformedAnswer(f"answer is not JSON ({exc}): {resp.text[:80]!r}") from None

        return self.call(what or f"{method} {path}", go)

    def get_json(self, path: str, **params: Any) -> Any:
        return self.request_json("GET", path, params=params or None)

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]],
                     existing: Callable[[], Mapping[str, int]], what: str = "the task import") -> list[int | None]:
        """Import tasks (each with a unique `data.request_id`) once, whatever the network does; returns their task
        ids in order (None where the server holds no such task afterwards).

        A POST that reached the server and then timed out may have created the tasks, so after a transient failure
        `existing()` (request_id -> task_id of the server's tasks) is asked before retrying, and only the tasks
        still missing are sent again. Verify, grid and box tasks all import through here."""
        body = list(tasks)
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.post(f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                                       json=body)
                resp.raise_for_status()
                answer = resp.json()
                ids = answer.get("task_ids") if isinstance(answer, dict) else None
                if ids is not None and len(ids) == len(body) and len(body) == len(tasks):
                    return [int(i) for i in ids]
                break  # an answer without ids (or a partial resend): map by listing below
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not _is_transient(exc):
                    raise CrowdError(f"Label Studio at {self.url} refused {what}: {_describe(exc, self._token)}",
                                     status=status_of(exc), transient=False) from None
                if attempt == self.retries:
                    raise CrowdError(
                        f"Label Studio at {self.url} did not answer {what} after {attempt + 1} tries; start it again "
                        "and rerun: requests are logged and reconciled, nothing is pushed twice",
                        status=status_of(exc), transient=True) from None
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, type(exc).__name__, attempt + 1,
                            self.retries, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
                try:
                    have = existing()
                except CrowdError:
                    continue
                body = [t for t in body if t["data"]["request_id"] not in have]
                if not body:
                    break
        found = existing()
        return [found.get(t["data"]["request_id"]) for t in tasks]

    # -- generic helpers used by provision/push/pull and the boxes stage -------------------------------
    def iter_tasks(self, project_id: int, page_size: int = 1000, fields: str = "all") -> Iterator[dict[str, Any]]:
        """Every task of a project (data, id, is_labeled, total_annotations), page by page."""
        yield from self._task_pages(project_id, page_size, fields=fields)

    def export_json(self, project_id: int, task_ids: list[int] | None = None) -> list[dict[str, Any]]:
        """Annotated tasks of a project with their annotations (the project's JSON export); with `task_ids`, only
        those tasks (annotated or not), asked in chunks (see `export_tasks`)."""
        if task_ids is not None:
            return self.export_tasks(project_id, task_ids)
        params: dict[str, Any] = {"exportType": "JSON", "download_all_tasks": "false"}
        return self.request_json("GET", f"/api/projects/{project_id}/export", "export annotations", params=params)

    def export_tasks(self, project_id: int, task_ids: list[int], chunk: int = EXPORT_CHUNK) -> list[dict[str, Any]]:
        """These tasks of a project with their annotations, from the JSON export. Label Studio 1.23.2 reads the task
        ids from `ids[]` (a plain `ids` is ignored and the whole project is exported) and Django refuses a request
        of more than 1,000 parameters, so ids go `chunk` at a time."""
        out: list[dict[str, Any]] = []
        ids = [int(i) for i in task_ids]
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            out += self.request_json("GET", f"/api/projects/{project_id}/export", f"export {len(part)} task(s)",
                                     params={"exportType": "JSON", "download_all_tasks": "true", "ids[]": part})
        return out

    def iter_filtered_tasks(self, project_id: int, filters: list[dict[str, Any]], *, page_size: int = 1000,
                            light: bool = True) -> Iterator[dict[str, Any]]:
        """Tasks of a project matching Data Manager `filters` (see `task_filter`; all must hold), in id order,
        page by page. `light`: the Data Manager computes none of its per-task columns (annotation results,
        annotators, agreement, ...), which costs most of a listing; ids, data, updated_at, is_labeled and the
        annotation counts are still there."""
        query: dict[str, Any] = {"filters": {"conjunction": "and", "items": filters}, "ordering": ["tasks:id"]}
        if light:
            query["hiddenColumns"] = {"explore": DM_COMPUTED, "labeling": DM_COMPUTED}
        yield from self._task_pages(project_id, page_size, query=json.dumps(query))

    def _task_pages(self, project_id: int, page_size: int, **params: Any) -> Iterator[dict[str, Any]]:
        """The Data Manager's task listing (`/api/tasks` with `params`), page by page until a short page, the
        listing's total or the 404 it answers past the last page."""
        page = 1
        while True:
            try:
                body = self.get_json("/api/tasks", project=project_id, page=page, page_size=page_size, **params)
            except CrowdError as exc:
                if exc.status == 404 and page > 1:
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            if not isinstance(tasks, list):
                raise CrowdError(f"Label Studio at {self.url} answered a task listing with {type(tasks).__name__}",
                                 status=None, transient=True)
            yield from tasks
            total = body.get("total") if isinstance(body, dict) else None
            if len(tasks) < page_size or (total is not None and page * page_size >= total):
                return
            page += 1

    def count_tasks(self, project_id: int, filters: list[dict[str, Any]]) -> int:
        """How many tasks of a project match `filters` (one page of one task; the listing's total)."""
        query = {"filters": {"conjunction": "and", "items": filters}, "ordering": ["tasks:id"],
                 "hiddenColumns": {"explore": DM_COMPUTED, "labeling": DM_COMPUTED}}
        body = self.get_json("/api/tasks", project=project_id, page=1, page_size=1, query=json.dumps(query))
        total = body.get("total") if isinstance(body, dict) else None
        if not isinstance(total, int):
            raise CrowdError(f"Label Studio at {self.url} answered a task count without a total", status=None,
                             transient=True)
        return total

    # -- accounts (admin only) --------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        """The account this client's token belongs to (id, email, ...)."""
        return self.request_json("GET", "/api/current-user/whoami", "look up the token's account")

    def list_users(self) -> list[dict[str, Any]]:
        """Every account of the organization (id, email, username, ...). An account taken out of the organization
        through Label Studio's People page is listed with its email masked as "Deleted"."""
        body = self.request_json("GET", "/api/users/", "list users", params={"page_size": 100000})
        users = body.get("results", body) if isinstance(body, dict) else body
        if not isinstance(users, list):
            raise CrowdError(f"Label Studio at {self.url} answered the user listing with {type(users).__name__}, "
                             "not a list of accounts", status=None, transient=False)
        return users

    def admin_site(self, password: str) -> AdminSite:
        """A logged-in session on the server's Django admin site, as the token's account (see `AdminSite`)."""
        site = getattr(self, "_admin_site", None)
        if site is None or site.password != password:
            site = AdminSite(self, password)
            self._admin_site = site
        return site

    def block_user(self, user_id: int, *, password: str) -> bool:
        """Deactivate an account: it can no longer log in or use its token, so it gets no task; its annotations are
        kept. True if it was active. `password`: the token account's password (crowd.admin_password)."""
        return self.admin_site(password).set_active(int(user_id), False)

    def unblock_user(self, user_id: int, *, password: str) -> bool:
        """Reactivate an account blocked by `block_user`. True if it was blocked."""
        return self.admin_site(password).set_active(int(user_id), True)

    def blocked_user_ids(self, *, password: str) -> set[int]:
        """Ids of the deactivated accounts."""
        return self.admin_site(password).inactive_user_ids()


def _describe(exc: BaseException, token: str) -> str:
    """A short error text with the token scrubbed (an SDK error may echo request headers)."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if isinstance(exc, httpx.HTTPStatusError):
        status, body = exc.response.status_code, exc.response.text[:300]
    text = f"HTTP {status}: {body}" if status else f"{type(exc).__name__}: {exc}"
    return text.replace(token, "***")[:500]


class _FormReader(HTMLParser):
    """The fields of one HTML form (by id) as a browser would submit them, and the ids a page links to."""

    def __init__(self, form_id: str | None = None):
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.inside = False
        self.fields: list[tuple[str, str]] = []
        self.checkboxes: dict[str, bool] = {}
        self._select: str | None = None
        self._textarea: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v if v is not None else "") for k, v in attrs}
        if tag == "form" and self.form_id is not None and a.get("id") == self.form_id:
            self.inside = True
        if not self.inside:
            return
        name = a.get("name")
        if tag == "input" and name:
            kind = a.get("type", "text").lower()
            if kind == "checkbox":
                self.checkboxes[name] = "checked" in a
            elif kind not in ("submit", "button", "image", "file", "reset"):
                self.fields.append((name, a.get("value", "")))
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select is not None and "selected" in a:
            self.fields.append((self._select, a.get("value", "")))
        elif tag == "textarea" and name:
            self._textarea, self._text = name, []

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self.inside:
            self.inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            self.fields.append((self._textarea, "".join(self._text).lstrip("\n")))
            self._textarea = None


class AdminSite:
    """Label Studio's Django admin site (/admin/), where an account can be deactivated and reactivated.

    Label Studio 1.23.2's REST API can take a member out of the organization (a soft delete) but cannot undo it,
    and a removed member who logs in again still sees the project list; it has no endpoint for an account's
    `is_active` flag. The admin site has: the server's superuser (the account `label-studio start` creates from
    LABEL_STUDIO_USERNAME, whose token synsetforge uses) logs in with its password and edits the account's
    Active box. A deactivated account cannot log in, its token and sessions stop working, its annotations stay.
    """

    def __init__(self, client: CrowdClient, password: str):
        if not password:
            raise CrowdError("no password for the Label Studio admin account: set SYNSETFORGE__CROWD__ADMIN_PASSWORD "
                             "(blocking goes through Label Studio's /admin/ site, which needs a login)",
                             status=None, transient=False)
        self.client = client
        self.password = password
        self.me: dict[str, Any] = {}
        self._s: httpx.Client | None = None

    def _get(self, path: str, what: str, **params: Any) -> httpx.Response:
        s = self._session()
        return self.client.call(what, lambda: s.get(path, params=params or None))

    def _session(self) -> httpx.Client:
        if self._s is not None:
            return self._s
        self.me = self.client.whoami()
        email = self.me.get("email") or ""
        s = httpx.Client(base_url=self.client.url, follow_redirects=True, timeout=self.client.timeout_s)

        def login() -> httpx.Response:
            s.get("/user/login/").raise_for_status()
            csrf = s.cookies.get("csrftoken") or ""
            resp = s.post("/user/login/", data={"email": email, "password": self.password,
                                                "csrfmiddlewaretoken": csrf}, headers={"X-CSRFToken": csrf})
            resp.raise_for_status()
            return resp

        self.client.call("log in to the admin site", login)
        if "sessionid" not in s.cookies:
            s.close()
            raise CrowdError(f"Label Studio at {self.client.url} refused the login of {email} (the token's account): "
                             "check SYNSETFORGE__CROWD__ADMIN_PASSWORD", status=401, transient=False)
        index = self.client.call("open the admin site", lambda: s.get("/admin/"))
        if index.status_code != 200 or "/admin/login" in str(index.url):
            s.close()
            raise CrowdError(f"{email} may not use Label Studio's /admin/ site (not a superuser); block accounts with "
                             "the token of the account `label-studio start` created", status=403, transient=False)
        self._s = s
        return s

    def _user_form(self, user_id: int) -> tuple[str, _FormReader]:
        path = f"/admin/users/user/{user_id}/change/"
        resp = self._get(path, f"open account {user_id} on the admin site")
        if resp.status_code == 404 or "/admin/users/user/" not in str(resp.url) or str(resp.url).endswith("/user/"):
            raise CrowdError(f"Label Studio at {self.client.url} has no account {user_id}", status=404, transient=False)
        resp.raise_for_status()
        form = _FormReader("user_form")
        form.feed(resp.text)
        if "is_active" not in form.checkboxes:
            raise CrowdError(f"the admin site's page for account {user_id} has no Active box (Label Studio "
                             "changed its admin form?)", status=None, transient=False)
        return path, form

    def set_active(self, user_id: int, active: bool) -> bool:
        """Set an account's Active flag; True if it changed. Never touches an administrator or the token's account."""
        path, form = self._user_form(user_id)
        if int(self.me.get("id", -1)) == user_id or form.checkboxes.get("is_staff") or form.checkboxes.get("is_superuser"):
            raise ProtectedAccount(f"account {user_id} is an administrator (or the token's own account): not changed",
                                   status=None, transient=False)
        if form.checkboxes["is_active"] == active:
            return False
        boxes = {**form.checkboxes, "is_active": active}
        data: dict[str, list[str]] = {}
        for k, v in [*form.fields, *((k, "on") for k, on in boxes.items() if on), ("_save", "Save")]:
            data.setdefault(k, []).append(v)
        csrf = dict(form.fields).get("csrfmiddlewaretoken", "")
        s = self._session()
        resp = self.client.call(f"{'unblock' if active else 'block'} account {user_id}", lambda: s.post(
            path, data=data, headers={"X-CSRFToken": csrf, "Referer": f"{self.client.url}{path}"}))
        resp.raise_for_status()
        _, after = self._user_form(user_id)
        if after.checkboxes["is_active"] != active:
            raise CrowdError(f"the admin site did not save account {user_id} (HTTP {resp.status_code}); "
                             f"{'unblock' if active else 'block'} it by hand at {self.client.url}{path}",
                             status=resp.status_code, transient=False)
        log.info("account %s %s", user_id, "reactivated" if active else "deactivated")
        return True

    def inactive_user_ids(self) -> set[int]:
        ids: set[int] = set()
        for page in range(1, 10_000):
            resp = self._get("/admin/users/user/", "list deactivated accounts", is_active__exact="0", p=str(page))
            resp.raise_for_status()
            html = resp.text
            start = html.find('id="result_list"')
            found = {int(i) for i in re.findall(r'/admin/users/user/(\d+)/change/', html[start:])} if start >= 0 else set()
            if not found - ids or "e=1" in str(resp.url).split("?")[-1].split("&"):
                return ids
            ids |= found
        return ids

    def close(self) -> None:
        if self._s is not None:
            self._s.close()
            self._s = None
