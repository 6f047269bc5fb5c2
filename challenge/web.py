"""The evaluation server: a Starlette app (served by uvicorn) with server-rendered pages and a JSON API.

Pages (Jinja2): the public leaderboard with intervals, the private one once the phase has closed, a team's
submissions (and its choice of finals), the upload form with the quota left, the analysis of a closed phase.
A browser signs in with its team's token (posted, never in a URL) and gets a session cookie (HttpOnly,
SameSite=Strict); every form post carries the session's CSRF token, and sign-in a pre-session one. The API
takes `Authorization: Bearer <token>` and no cookies. Uploads are read up to the challenge's size cap (the
body is counted as it arrives, whatever Content-Length says); nothing a client sends is used in a file path
(stored uploads are named by their sha256). Tokens are never logged: uvicorn's access log shows paths only.

    uvicorn --factory challenge.web:app_from_env    # SYNSETFORGE_CHALLENGE_STORE, SYNSETFORGE_CHALLENGE_DB
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from challenge.boards import build_board
from challenge.db import Submission, read_session, utcnow
from challenge.service import (
    ChallengeService,
    Forbidden,
    InvalidSubmission,
    LimitReached,
    NotRevealed,
    PhaseNotOpen,
    Principal,
    TooLarge,
)
from challenge.truth import ChallengeError

STORE_ENV = "SYNSETFORGE_CHALLENGE_STORE"
SESSION_COOKIE = "sf_session"
PRE_COOKIE = "sf_pre"
FORM_OVERHEAD = 64 << 10
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]))
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


TEMPLATES.filters["score"] = _fmt
TEMPLATES.filters["when"] = lambda t: f"{t:%Y-%m-%d %H:%M} UTC" if isinstance(t, datetime) else "-"


class BodyTooLarge(Exception):
    pass


async def _body(request: Request, cap: int) -> bytes:
    """The request body, refused as soon as more than `cap` bytes have arrived."""
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(svc: ChallengeService, *, secure_cookies: bool = False) -> Starlette:
    def page(name: str, request: Request, status: int = 200, **ctx: Any) -> HTMLResponse:
        who, csrf = getattr(request.state, "who", None), getattr(request.state, "csrf", None)
        html = TEMPLATES.get_template(name).render(who=who, csrf=csrf, **ctx)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def message(request: Request, title: str, text: str, status: int, **ctx: Any) -> HTMLResponse:
        return page("message.html", request, status, title=title, text=text, **ctx)

    def api(data: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(_clean(json.loads(json.dumps(data, default=_json))), status_code=status,
                            headers=SECURITY_HEADERS)

    async def browser(request: Request) -> Principal | None:
        found = await run_in_threadpool(svc.session, request.cookies.get(SESSION_COOKIE))
        request.state.who, request.state.csrf = found if found else (None, None)
        return request.state.who

    async def bearer(request: Request) -> Principal | None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return await run_in_threadpool(svc.authenticate, auth[7:].strip())

    def csrf_ok(request: Request, form: Any) -> bool:
        expected = getattr(request.state, "csrf", None)
        given = form.get("csrf") if form is not None else None
        return bool(expected and isinstance(given, str) and hmac.compare_digest(expected, given))

    async def challenge_or_404(request: Request) -> Any:
        try:
            return await run_in_threadpool(svc.challenge, request.path_params["slug"])
        except ChallengeError:
            return None

    # ---------------------------------------------------------------- pages
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def index(request: Request) -> Response:
        await browser(request)
        rows = []
        for ch in await run_in_threadpool(svc.challenges):
            phases = await run_in_threadpool(svc.phases, ch)
            rows.append({"ch": ch, "phases": phases})
        return page("index.html", request, challenges=rows, now=utcnow())

    async def signin_form(request: Request) -> Response:
        await browser(request)
        pre = secrets.token_urlsafe(24)
        nxt = request.query_params.get("next", "")
        resp = page("signin.html", request, pre=pre, error=None, next=nxt if _local_path(nxt) else "")
        resp.set_cookie(PRE_COOKIE, pre, httponly=True, samesite="strict", secure=secure_cookies, max_age=1800)
        return resp

    async def signin(request: Request) -> Response:
        body = await _form(request, FORM_OVERHEAD)
        if body is None:
            return PlainTextResponse("request too large", 413)
        pre = request.cookies.get(PRE_COOKIE, "")
        given = body.get("pre")
        if not pre or not isinstance(given, str) or not hmac.compare_digest(pre, given):
            return message(request, "Sign-in refused", "The form expired or did not come from this site; open the "
                           "sign-in page again.", 403)
        token = body.get("token")
        started = await run_in_threadpool(svc.start_session, token.strip() if isinstance(token, str) else "")
        if started is None:
            request.state.who = None
            return page("signin.html", request, 401, pre=pre, next="", error="That token is not valid (or was revoked).")
        cookie, _csrf, _who = started
        nxt = body.get("next")
        target = nxt if isinstance(nxt, str) and _local_path(nxt) else "/"
        resp = RedirectResponse(target, 303)
        resp.set_cookie(SESSION_COOKIE, cookie, httponly=True, samesite="strict", secure=secure_cookies,
                        max_age=12 * 3600)
        resp.delete_cookie(PRE_COOKIE)
        return resp

    async def signout(request: Request) -> Response:
        await browser(request)
        form = await _form(request, FORM_OVERHEAD)
        if request.state.who is None or not csrf_ok(request, form):
            return message(request, "Refused", "Sign-out needs the form of this site.", 403)
        await run_in_threadpool(svc.end_session, request.cookies.get(SESSION_COOKIE, ""))
        resp = RedirectResponse("/", 303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    async def board_page(request: Request) -> Response:
        await browser(request)
        ch = await challenge_or_404(request)
        if ch is None:
            return message(request, "Not found", "No such challenge.", 404)
        kind = "private" if request.url.path.endswith("/private") else "public"
        try:
            board = await run_in_threadpool(build_board, svc, ch.slug, kind)
        except NotRevealed as exc:
            return message(request, "Private leaderboard", str(exc), 403, ch=ch)
        phase = await run_in_threadpool(svc.phase, ch)
        return page("board.html", request, ch=ch, board=board, phase=phase, now=utcnow())

    async def submit_form(request: Request) -> Response:
        who = await browser(request)
        ch = await challenge_or_404(request)
        if ch is None:
            return message(request, "Not found", "No such challenge.", 404)
        if who is None or who.team_id is None:
            return RedirectResponse(f"/signin?next=/c/{ch.slug}/submit", 303)
        return await _submit_page(request, ch, who, None, 200)

    async def _submit_page(request: Request, ch: Any, who: Principal, result: dict[str, Any] | None, status: int
                           ) -> Response:
        quota = await run_in_threadpool(svc.quota, ch.slug, who.team_id)
        phase = await run_in_threadpool(svc.phase, ch)
        left = min((w.left for w in quota), default=None)
        return page("submit.html", request, status, ch=ch, quota=quota, left=left, phase=phase, result=result,
                    now=utcnow())

    async def submit_post(request: Request) -> Response:
        who = await browser(request)
        ch = await challenge_or_404(request)
        if ch is None:
            return message(request, "Not found", "No such challenge.", 404)
        if who is None or who.team_id is None:
            return message(request, "Sign in first", "Uploads need a team's session.", 401)
        form = await _form(request, ch.max_upload_bytes + FORM_OVERHEAD, files=True)
        if form is None:
            return await _submit_page(request, ch, who, {"error": f"The file is larger than this challenge's "
                                                                  f"limit of {ch.max_upload_bytes} bytes."}, 413)
        if not csrf_ok(request, form):
            return message(request, "Refused", "The upload form did not come from this site (CSRF check).", 403)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return await _submit_page(request, ch, who, {"error": "Choose a file to upload."}, 400)
        data = await upload.read()
        desc = form.get("description") if isinstance(form.get("description"), str) else ""
        result, status = await _do_submit(ch, who, data, desc)
        return await _submit_page(request, ch, who, result, status)

    async def _do_submit(ch: Any, who: Principal, data: bytes, desc: str) -> tuple[dict[str, Any], int]:
        try:
            r = await run_in_threadpool(lambda: svc.submit(ch.slug, who.team_id, data, description=desc))
        except InvalidSubmission as exc:
            return {"error": "The submission was not scored and does not count against your limit.",
                    "problems": exc.problems}, 422
        except LimitReached as exc:
            return {"error": str(exc), "limit": True,
                    "resets_at": exc.resets_at}, 429
        except (PhaseNotOpen, TooLarge) as exc:
            return {"error": str(exc)}, 409 if isinstance(exc, PhaseNotOpen) else 413
        return {"ok": True, "id": r.submission_id, "score": r.shown_score, "metric": r.metric,
                "moved": r.ladder_moved, "ladder": ch.ladder, "left": min((w.left for w in r.quota), default=None)}, 201

    async def submissions_page(request: Request) -> Response:
        who = await browser(request)
        ch = await challenge_or_404(request)
        if ch is None:
            return message(request, "Not found", "No such challenge.", 404)
        if who is None or who.team_id is None:
            return RedirectResponse(f"/signin?next=/c/{ch.slug}/submissions", 303)
        subs = await run_in_threadpool(svc.team_submissions, ch.slug, who.team_id)
        return page("submissions.html", request, ch=ch, subs=subs, note=request.query_params.get("saved"))

    async def submission_detail(request: Request) -> Response:
        who = await browser(request)
        ch = await challenge_or_404(request)
        sub = await run_in_threadpool(_own, ch, who, request.path_params["sub_id"])
        if sub is None:
            return message(request, "Not found", "No such submission of your team.", 404)
        if request.url.path.endswith("/file"):
            data = await run_in_threadpool(_stored_upload, ch, sub)
            if data is None:
                return message(request, "Not kept", "This server keeps no copy of that upload.", 404)
            return Response(data, media_type="application/octet-stream", headers={
                **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="submission-{sub["id"]}.bin"'})
        return page("submission.html", request, ch=ch, sub=sub)

    def _own(ch: Any, who: Principal | None, sub_id: str) -> dict[str, Any] | None:
        if ch is None or who is None or who.team_id is None or not sub_id.isdigit():
            return None
        for s in svc.team_submissions(ch.slug, who.team_id):
            if s["id"] == int(sub_id):
                return s
        return None

    def _stored_upload(ch: Any, sub: dict[str, Any]) -> bytes | None:
        from challenge.service import upload_key

        key = upload_key(ch.slug, sub["sha256"])
        return svc.store.get(key) if svc.store is not None and svc.store.exists(key) else None

    async def finals_post(request: Request) -> Response:
        who = await browser(request)
        ch = await challenge_or_404(request)
        if ch is None or who is None or who.team_id is None:
            return message(request, "Sign in first", "Choosing finals needs a team's session.", 401)
        form = await _form(request, FORM_OVERHEAD)
        if not csrf_ok(request, form):
            return message(request, "Refused", "The form did not come from this site (CSRF check).", 403)
        ids = [int(v) for v in form.getlist("final") if isinstance(v, str) and v.isdigit()]
        try:
            await run_in_threadpool(svc.select_finals, ch.slug, who.team_id, ids)
        except ChallengeError as exc:
            return message(request, "Not saved", str(exc), 400, ch=ch)
        return RedirectResponse(f"/c/{ch.slug}/submissions?saved=1", 303)

    async def analysis_page(request: Request) -> Response:
        await browser(request)
        ch = await challenge_or_404(request)
        if ch is None:
            return message(request, "Not found", "No such challenge.", 404)
        from challenge.analysis import analysis_for

        try:
            a = await run_in_threadpool(analysis_for, svc, ch.slug)
        except NotRevealed as exc:
            return message(request, "Analysis", f"The analysis is shown with the private leaderboard: {exc}", 403,
                           ch=ch)
        table = a.classes.to_dict("records")
        return page("analysis.html", request, ch=ch, a=a, table=table)

    async def listing(request: Request) -> Response:
        ch = await challenge_or_404(request)
        if ch is None:
            return PlainTextResponse("no such challenge", 404)
        held = await run_in_threadpool(svc.held_out, ch.release)
        text = "".join(f"{f} {i}\n" for f, i in zip(held.files, held.image_ids, strict=True))
        return PlainTextResponse(text, headers=SECURITY_HEADERS)

    # ---------------------------------------------------------------- API
    async def api_challenges(request: Request) -> Response:
        out = []
        for ch in await run_in_threadpool(svc.challenges):
            phases = await run_in_threadpool(svc.phases, ch)
            out.append({"slug": ch.slug, "title": ch.title, "release": ch.release, "task": ch.task, "ladder": ch.ladder,
                        "test_images": ch.n_test, "phases": [{"name": p.name, "opens_at": p.opens_at,
                                                              "closes_at": p.closes_at, "per_day": p.per_day,
                                                              "per_week": p.per_week, "per_phase": p.per_phase}
                                                             for p in phases]})
        return api(out)

    async def api_board(request: Request) -> Response:
        ch = await challenge_or_404(request)
        if ch is None:
            return api({"error": "no such challenge"}, 404)
        kind = request.query_params.get("board", "public")
        if kind not in ("public", "private"):
            return api({"error": "board is public or private"}, 400)
        try:
            board = await run_in_threadpool(build_board, svc, ch.slug, kind)
        except NotRevealed as exc:
            return api({"error": str(exc)}, 403)
        return api({"challenge": ch.slug, "phase": board.phase, "board": kind, "metric": board.metric,
                    "confidence": board.confidence, "rounds": board.rounds, "n_images": board.n_images,
                    "rows": [r.__dict__ for r in board.rows]})

    async def api_submit(request: Request) -> Response:
        who = await bearer(request)
        if who is None or who.team_id is None:
            return api({"error": "a team token is needed: Authorization: Bearer <token>"}, 401)
        ch = await challenge_or_404(request)
        if ch is None:
            return api({"error": "no such challenge"}, 404)
        try:
            data = await _body(request, ch.max_upload_bytes)
        except BodyTooLarge:
            return api({"error": f"larger than this challenge's limit of {ch.max_upload_bytes} bytes"}, 413)
        result, status = await _do_submit(ch, who, data, request.headers.get("x-description", "")[:200])
        return api(result, status)

    async def api_submissions(request: Request) -> Response:
        who = await bearer(request)
        ch = await challenge_or_404(request)
        if who is None or who.team_id is None or ch is None:
            return api({"error": "a team token is needed"}, 401)
        return api(await run_in_threadpool(svc.team_submissions, ch.slug, who.team_id))

    async def api_quota(request: Request) -> Response:
        who = await bearer(request)
        ch = await challenge_or_404(request)
        if who is None or who.team_id is None or ch is None:
            return api({"error": "a team token is needed"}, 401)
        q = await run_in_threadpool(svc.quota, ch.slug, who.team_id)
        return api([{"window": w.kind, "used": w.used, "limit": w.limit, "left": w.left, "resets_at": w.end}
                    for w in q])

    async def api_finals(request: Request) -> Response:
        who = await bearer(request)
        ch = await challenge_or_404(request)
        if who is None or who.team_id is None or ch is None:
            return api({"error": "a team token is needed"}, 401)
        try:  # the body first: ChallengeError is a ValueError too, so the service is called outside this try
            ids = [int(i) for i in json.loads(await _body(request, FORM_OVERHEAD))["ids"]]
        except (ValueError, KeyError, TypeError, BodyTooLarge):
            return api({"error": 'send {"ids": [submission ids]}'}, 400)
        try:
            chosen = await run_in_threadpool(svc.select_finals, ch.slug, who.team_id, ids)
        except Forbidden as exc:
            return api({"error": str(exc)}, 403)
        except ChallengeError as exc:
            return api({"error": str(exc)}, 400)
        return api({"final": chosen})

    async def api_flags(request: Request) -> Response:
        who = await bearer(request)
        ch = await challenge_or_404(request)
        if who is None or who.role != "organiser" or ch is None:
            return api({"error": "an organiser token is needed"}, 403)
        return api(await run_in_threadpool(svc.flags, ch.slug))

    async def _form(request: Request, cap: int, *, files: bool = False) -> Any:
        try:
            body = await _body(request, cap)
        except BodyTooLarge:
            return None

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        return await Request(request.scope, replay).form(max_files=1 if files else 0, max_fields=20)

    routes = [
        Route("/healthz", healthz),
        Route("/", index),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/c/{slug}", board_page),
        Route("/c/{slug}/private", board_page),
        Route("/c/{slug}/submit", submit_form, methods=["GET"]),
        Route("/c/{slug}/submit", submit_post, methods=["POST"]),
        Route("/c/{slug}/submissions", submissions_page),
        Route("/c/{slug}/submissions/{sub_id}", submission_detail),
        Route("/c/{slug}/submissions/{sub_id}/file", submission_detail),
        Route("/c/{slug}/finals", finals_post, methods=["POST"]),
        Route("/c/{slug}/analysis", analysis_page),
        Route("/c/{slug}/test-images.txt", listing),
        Route("/api/challenges", api_challenges),
        Route("/api/c/{slug}/leaderboard", api_board),
        Route("/api/c/{slug}/submissions", api_submit, methods=["POST"]),
        Route("/api/c/{slug}/submissions", api_submissions, methods=["GET"]),
        Route("/api/c/{slug}/quota", api_quota),
        Route("/api/c/{slug}/finals", api_finals, methods=["POST"]),
        Route("/api/c/{slug}/flags", api_flags),
    ]
    return Starlette(routes=routes)


def _json(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat() + "Z"
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _local_path(path: str) -> bool:
    """A redirect target on this site only: /c/<slug>/..., no scheme, host or backslash."""
    return path.startswith("/c/") and "//" not in path and "\\" not in path and ":" not in path and len(path) < 200


def _clean(v: Any) -> Any:
    """NaN (a board cell with no value) as null: JSON has no NaN."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def app_from_env() -> Starlette:
    """The app for `uvicorn --factory` (and `synsetforge challenge serve`): store and database from the environment."""
    from challenge.service import open_service

    svc = open_service(os.environ.get(STORE_ENV, "data"), os.environ.get("SYNSETFORGE_CHALLENGE_DB"))
    return create_app(svc, secure_cookies=os.environ.get("SYNSETFORGE_CHALLENGE_SECURE_COOKIES", "") == "1")


__all__ = ["create_app", "app_from_env", "select", "Submission", "read_session"]
